"""``models.train`` from 1 process to many: DDP on 2 gloo CPU processes, one codebook on every
rank, fault tolerance (SIGTERM + exact resume, newest valid checkpoint), gradient accumulation,
weight EMA, NaN guard, and the layer under FSDP2.

One ``torch.multiprocessing.spawn`` runs every 2-rank scenario inside one process group (process
start-up dominates; ``train()`` reuses a group that is already open).  The single-process runs
they are compared with run in the pytest process.  Tiny VQ-VAE on ``digits``, global batch 8.

Why the comparisons hold:

* 2 ranks x 4 vs 1 process x 8: the ranks draw the same global batch from one data generator and
  keep their halves, DDP averages the gradients, the layer all-reduces the EMA statistics.  With
  k-means init and dead-code restarts off (their random draws come from rank 0's half, not the
  whole batch) the losses agree step by step up to fp32 summation order.
* Gradient accumulation 2 x 4 vs 8: the micro-losses are halved, the codebook is frozen between
  micro-steps and updated once on both halves in order, k-means runs once on the whole batch:
  the same arithmetic up to summation order, k-means and restarts included.
* SIGTERM then ``--resume`` vs uninterrupted: both are 2-rank runs with identical arithmetic and
  the checkpoint restores every rank's RNG and the data position -> bitwise equal.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import torch.distributed as dist

import models
from models import checkpoint as ck
from models.train import train
from vqkernels.distributed import find_free_port

pytestmark = pytest.mark.distributed

WORLD = 2
# kmeans off, restarts off: the only random choices left are the data (shared generator).
NO_RANDOM = ["--set", "kmeans_init=false", "--set", "threshold_ema_dead_code=0"]


def _argv(out, steps: int, *extra: str) -> list[str]:
    return [
        "--model", "vqvae", "--dataset", "digits", "--config", "tiny", "--steps", str(steps),
        "--batch-size", "8", "--out", str(out), "--backend", "reference", "--device", "cpu",
        "--quiet", "--eval-every", "0", "--log-every", "1", *extra,
    ]  # fmt: skip


def _losses(out) -> list[float]:
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


# ----------------------------------------------------------------------------- 2-rank worker


def _fsdp2_net():
    from vqkernels.nn import VectorQuantizer

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Linear(6, 8)
            self.vq = VectorQuantizer(8, 16, decay=0.8, backend="reference")
            self.dec = torch.nn.Linear(8, 6)

        def forward(self, x):
            q, _, loss = self.vq(self.enc(x))
            return self.dec(q), loss

    torch.manual_seed(0)
    return Net()


def _fsdp2_steps(net, part: slice) -> list[float]:
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    losses = []
    for s in range(3):
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(s))[part]
        y, vq_loss = net(x)
        loss = ((y - x) ** 2).mean() + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _worker(rank: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    res: dict = {}
    try:
        import models.train as mt
        from vqkernels.nn import VectorQuantizer

        # (1) 2 ranks x half batch, no random choices: compared with 1 process x full batch.
        res["ddp"] = train(_argv(os.path.join(root, "ddp"), 5, *NO_RANDOM))

        # (2) k-means init + dead-code restarts on every step (threshold 8 > the mean usage of
        # 128 vectors over 32 codes): every rank must end with the same codebook.  Record each
        # rank's model and how many restarts actually happened.
        built, restarts = [], [0]
        real_build, real_restart = mt.build_model, VectorQuantizer._restart_dead_codes

        def build(*a, **k):
            built.append(real_build(*a, **k))
            return built[-1]

        def restart(self, flat, valid, sync):
            restarts[0] += int(bool((self.cluster_size < self.threshold_ema_dead_code).any()))
            return real_restart(self, flat, valid, sync)

        mt.build_model, VectorQuantizer._restart_dead_codes = build, restart
        try:
            res["random"] = train(
                _argv(os.path.join(root, "random"), 6, "--set", "threshold_ema_dead_code=8",
                      "--eval-every", "3")
            )  # fmt: skip
        finally:
            mt.build_model, VectorQuantizer._restart_dead_codes = real_build, real_restart
        q = built[0].quantizer
        res["random_state"] = {k: v.clone() for k, v in q.state_dict().items()}
        res["random_restarts"] = restarts[0]

        # (2b) VQGAN: generator and discriminator in separate DDP wrappers, the discriminator
        # called twice per update (real, fake), micro-batches; BatchNorm -> GroupNorm on CPU.
        gans = []
        real_loss = mt.VQGANLoss

        def make_loss(*a, **k):
            gans.append(real_loss(*a, **k))
            return gans[-1]

        mt.VQGANLoss = make_loss
        try:
            vqgan_argv = _argv(os.path.join(root, "vqgan"), 3, "--disc-start", "1",
                               "--grad-accum", "2")  # fmt: skip
            vqgan_argv[vqgan_argv.index("vqvae")] = "vqgan"
            res["vqgan"] = train(vqgan_argv)
        finally:
            mt.VQGANLoss = real_loss
        res["vqgan_disc"] = {k: v.clone() for k, v in gans[0].discriminator.state_dict().items()}

        # (3) SIGTERM on rank 1 after its 3rd step, then --resume, vs an uninterrupted run
        # (k-means and restarts on: every rank's RNG must be restored).
        res["straight"] = train(_argv(os.path.join(root, "straight"), 7, "--ema-decay", "0.9"))
        real_step, calls = mt.vqvae_step, [0]

        def step_then_signal(*a, **k):
            out = real_step(*a, **k)
            calls[0] += 1
            if rank == 1 and calls[0] == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        mt.vqvae_step = step_then_signal
        try:
            inter = os.path.join(root, "interrupted")
            res["interrupted"] = train(_argv(inter, 7, "--ema-decay", "0.9"))
        finally:
            mt.vqvae_step = real_step
        res["resumed"] = train(_argv(inter, 7, "--resume"))

        # (3b) a 1-process checkpoint (made by the fixture) resumed on 2 ranks.
        res["regrown"] = train(_argv(os.path.join(root, "regrow"), 5, *NO_RANDOM, "--resume"))

        # (4) FSDP2: the layer (EMA buffers synced at call time) trains under fully_shard.
        from torch.distributed.fsdp import fully_shard

        net = _fsdp2_net()
        fully_shard(net.enc)
        fully_shard(net.dec)
        fully_shard(net)
        per = 16 // WORLD
        res["fsdp_losses"] = _fsdp2_steps(net, slice(rank * per, (rank + 1) * per))
        res["fsdp_vq"] = {k: v.clone() for k, v in net.vq.state_dict().items()}
        res["fsdp_params"] = {
            n: p.full_tensor().detach().clone() for n, p in net.named_parameters()
        }
        torch.save(res, os.path.join(root, f"rank{rank}.pt"))

        # (5) last (it breaks the group): rank 1 dies in its 3rd step; rank 0 must stop with a
        # clear error instead of hanging (gloo sees the closed connection at once).
        def step_then_die(*a, **k):
            calls[0] += 1
            if rank == 1 and calls[0] == 3:
                os._exit(0)
            return real_step(*a, **k)

        calls[0] = 0
        mt.vqvae_step = step_then_die
        try:
            train(_argv(os.path.join(root, "dead"), 10))
            outcome = "no error"
        except Exception as exc:  # noqa: BLE001 - the test inspects whatever came out
            outcome = f"{type(exc).__name__}: {exc}"
        finally:
            mt.vqvae_step = real_step
        with open(os.path.join(root, "dead.txt"), "w") as f:
            f.write(outcome)
    finally:
        if not os.path.exists(os.path.join(root, f"rank{rank}.pt")):
            torch.save(res, os.path.join(root, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ddp"))
    train(_argv(os.path.join(root, "regrow"), 5, *NO_RANDOM, "--stop-after", "3"))
    torch.multiprocessing.spawn(_worker, args=(find_free_port(), root), nprocs=WORLD, join=True)
    res = [torch.load(os.path.join(root, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    return root, res


# ----------------------------------------------------------------------------- 2-rank tests


def test_two_ranks_half_batch_match_one_process_full_batch(two_ranks, tmp_path):
    root, res = two_ranks
    single = train(_argv(tmp_path, 5, *NO_RANDOM))
    two = _losses(os.path.join(root, "ddp"))
    one = _losses(tmp_path)
    assert len(two) == len(one) == 5
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-6)
    m = res[0]["ddp"]
    assert m["world_size"] == 2 and m["global_batch_size"] == 8 and m["per_rank_batch_size"] == 4
    assert single["world_size"] == 1 and single["codebook_rank_max_abs_diff"] == 0.0
    a = ck.load_checkpoint(os.path.join(root, "ddp", "checkpoint.pt"))["model"]
    b = ck.load_checkpoint(str(tmp_path / "checkpoint.pt"))["model"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    disk = json.loads(open(os.path.join(root, "ddp", "metrics.json")).read())
    assert disk["world_size"] == 2 and disk["codebook_rank_max_abs_diff"] == 0.0


def test_one_process_checkpoint_resumes_on_two_ranks(two_ranks, tmp_path):
    root, res = two_ranks
    train(_argv(tmp_path, 5, *NO_RANDOM))
    assert res[0]["regrown"]["steps_this_run"] == 2 and res[0]["regrown"]["world_size"] == 2
    grown, one = _losses(os.path.join(root, "regrow")), _losses(tmp_path)
    assert len(grown) == 5  # 3 steps on 1 process, then 2 on 2 ranks (the log is appended)
    torch.testing.assert_close(torch.tensor(grown), torch.tensor(one), rtol=1e-5, atol=1e-6)


def test_codebooks_bit_identical_across_ranks_with_kmeans_and_restarts(two_ranks):
    _, res = two_ranks
    assert res[0]["random_restarts"] > 0  # the restarts really ran (rank 0 decided, broadcast)
    s0, s1 = res[0]["random_state"], res[1]["random_state"]
    assert bool(s0["initted"])
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    for r in range(WORLD):
        assert res[r]["random"]["codebook_rank_max_abs_diff"] == 0.0
        assert len(res[r]["random"]["history"]) == 1  # evaluated at step 3 (and at the end)


def test_vqgan_discriminator_identical_across_ranks(two_ranks):
    root, res = two_ranks
    d0, d1 = res[0]["vqgan_disc"], res[1]["vqgan_disc"]
    assert not any("running_mean" in k for k in d0)  # GroupNorm, not per-rank BatchNorm
    for k in d0:
        assert torch.equal(d0[k], d1[k]), k
    cfg = json.loads(open(os.path.join(root, "vqgan", "config.json")).read())["model"]
    assert cfg["disc_norm"] == "group"
    assert res[0]["vqgan"]["codebook_rank_max_abs_diff"] == 0.0


def test_sigterm_on_one_rank_stops_all_then_resume_equals_uninterrupted(two_ranks):
    root, res = two_ranks
    assert res[1]["interrupted"]["stopped_by"] == "SIGTERM"
    assert res[0]["interrupted"]["stopped_by"] == "a signal on another rank"
    assert res[0]["interrupted"]["steps"] == res[1]["interrupted"]["steps"] == 3
    for r in range(WORLD):
        assert res[r]["resumed"]["steps"] == 7 and res[r]["resumed"]["steps_this_run"] == 4
        assert res[r]["resumed"]["final_loss"] == res[r]["straight"]["final_loss"]
    a = ck.load_checkpoint(os.path.join(root, "interrupted", "checkpoint.pt"))
    b = ck.load_checkpoint(os.path.join(root, "straight", "checkpoint.pt"))
    for part in ("model", "ema_model"):
        for k in b[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert len(a["train"]["rng_torch_ranks"]) == 2
    assert _losses(os.path.join(root, "interrupted")) == _losses(os.path.join(root, "straight"))
    # --keep-last 2 (default): the two newest step checkpoints beside checkpoint.pt
    steps = [s for s, _ in ck.step_checkpoints(os.path.join(root, "interrupted"))]
    assert steps == [7, 3]


def test_a_dead_rank_stops_the_others_with_a_clear_message(two_ranks):
    root, _ = two_ranks
    with open(os.path.join(root, "dead.txt")) as f:
        outcome = f.read()
    assert outcome.startswith("PeerLostError: rank 0/2"), outcome
    assert "another rank died or stopped answering" in outcome


def test_layer_trains_under_fsdp2_like_one_process(two_ranks):
    _, res = two_ranks
    net = _fsdp2_net()
    losses = _fsdp2_steps(net, slice(None))
    for r in range(WORLD):
        for k, v in net.vq.state_dict().items():
            torch.testing.assert_close(res[r]["fsdp_vq"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        for n, p in net.named_parameters():
            torch.testing.assert_close(res[r]["fsdp_params"][n], p.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(res[0]["fsdp_vq"]["codebook"], res[1]["fsdp_vq"]["codebook"])
    # the mean of the ranks' half-batch losses is the full-batch loss
    mean = [(a + b) / 2 for a, b in zip(res[0]["fsdp_losses"], res[1]["fsdp_losses"])]
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(losses), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- single process


def test_truncated_newest_checkpoint_falls_back_and_resumes_exactly(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    straight = train(_argv(b, 6))
    train(_argv(a, 6, "--eval-every", "2", "--stop-after", "6"))
    assert [s for s, _ in ck.step_checkpoints(str(a))] == [6, 4]  # step 2 rotated out
    newest = a / "checkpoint.pt"
    size = newest.stat().st_size
    with open(newest, "r+b") as f:  # checkpoint.pt and step 6 share their bytes (hard link)
        f.truncate(size // 2)
    if (a / "checkpoint-step00000006.pt").stat().st_size == size:  # no hard links here
        with open(a / "checkpoint-step00000006.pt", "r+b") as f:
            f.truncate(size // 3)
    with pytest.warns(RuntimeWarning, match="skipping checkpoint"):
        resumed = train(_argv(a, 6, "--resume"))
    assert resumed["steps"] == 6 and resumed["steps_this_run"] == 2  # from step 4
    assert resumed["final_loss"] == straight["final_loss"]
    sa = ck.load_checkpoint(str(newest))["model"]
    sb = ck.load_checkpoint(str(b / "checkpoint.pt"))["model"]
    for k in sb:
        assert torch.equal(sa[k], sb[k]), k


def test_no_valid_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a zip file")
    with pytest.warns(RuntimeWarning, match="skipping checkpoint"):
        with pytest.raises(ck.CheckpointError, match="no valid checkpoint"):
            train(_argv(tmp_path, 2, "--resume"))


def test_grad_accum_two_halves_equals_full_batch(tmp_path):
    """k-means init and dead-code restarts stay on: they see the whole batch either way."""
    full = train(_argv(tmp_path / "full", 5, "--set", "threshold_ema_dead_code=8"))
    acc = train(_argv(tmp_path / "acc", 5, "--set", "threshold_ema_dead_code=8",
                      "--grad-accum", "2"))  # fmt: skip
    one, two = _losses(tmp_path / "full"), _losses(tmp_path / "acc")
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-6)
    a = ck.load_checkpoint(str(tmp_path / "acc" / "checkpoint.pt"))["model"]
    b = ck.load_checkpoint(str(tmp_path / "full" / "checkpoint.pt"))["model"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert acc["grad_accum"] == 2 and full["grad_accum"] == 1


def test_scale_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="divisible by --grad-accum 3"):
        train(_argv(tmp_path, 1, "--grad-accum", "3"))
    with pytest.raises(ValueError, match="--keep-last"):
        train(_argv(tmp_path, 1, "--keep-last", "-1"))
    with pytest.raises(ValueError, match="--ema-decay"):
        train(_argv(tmp_path, 1, "--ema-decay", "1.5"))


def test_weight_ema_is_evaluated_saved_and_loaded_by_default(tmp_path):
    m = train(_argv(tmp_path, 4, "--ema-decay", "0.5"))
    assert set(m["ema"]) >= {"psnr", "ssim", "codebook_usage", "perplexity", "decay"}
    ckpt = ck.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    ema, raw = ckpt["ema_model"], ckpt["model"]
    assert torch.equal(ema["quantizer.codebook"], raw["quantizer.codebook"])  # buffers copied
    assert not torch.equal(ema["encoder.0.weight"], raw["encoder.0.weight"])  # weights averaged
    auto = models.load(str(tmp_path / "checkpoint.pt"), backend="reference")
    plain = models.load(str(tmp_path / "checkpoint.pt"), backend="reference", weights="raw")
    assert torch.equal(auto.state_dict()["encoder.0.weight"], ema["encoder.0.weight"])
    assert torch.equal(plain.state_dict()["encoder.0.weight"], raw["encoder.0.weight"])


def test_nan_guard_stops_with_a_clear_message(tmp_path, monkeypatch):
    import models.steps as steps

    real, calls = steps.reconstruction_loss, [0]

    def poisoned(recon, images, *rest):  # rest: lab_weight
        calls[0] += 1
        out = real(recon, images, *rest)
        return out * float("nan") if calls[0] == 2 else out

    monkeypatch.setattr(steps, "reconstruction_loss", poisoned)
    with pytest.raises(FloatingPointError, match="loss became nan at step 2"):
        train(_argv(tmp_path, 4))


def test_evaluation_reports_the_perceptual_distance(tmp_path):
    m = train(_argv(tmp_path, 2, "--perceptual", "ssim"))
    assert m["perceptual"] == "ssim" and m["perceptual_distance"] > 0
    assert m["per_image"]["digits"]["perceptual_distance"] == m["perceptual_distance"]
    assert train(_argv(tmp_path / "none", 1))["perceptual_distance"] is None


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, precision):
    m = train(_argv(tmp_path, 3, "--precision", precision))
    assert m["precision"] == precision and all(map(lambda x: x == x, _losses(tmp_path)))
    ckpt = ck.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert ckpt["model"]["quantizer.codebook"].dtype == torch.float32
    assert ("scaler" in ckpt["train"]) == (precision == "fp16")


def test_vqgan_step_with_defaults_equals_vqgan_train_step():
    from models.perceptual import build_perceptual
    from models.steps import StepConfig, vqgan_step
    from models.vqgan import VQGAN, VQGANLoss, make_vqgan_optimizers, vqgan_config, vqgan_train_step

    cfg = vqgan_config("tiny", in_channels=1, disc_start=1, perceptual_weight=0.0)
    x = models.data.load_dataset("digits", "eval")[:4]
    runs = []
    for use_new in (False, True):
        torch.manual_seed(0)
        model = VQGAN(cfg, backend="reference").train()
        gan = VQGANLoss(cfg, build_perceptual("none")[0])
        opt_g, opt_d = make_vqgan_optimizers(model, gan)
        out = []
        for s in range(3):
            if use_new:
                r = vqgan_step(model, gan.discriminator, gan, opt_g, opt_d, x, s,
                               StepConfig(1, "fp32", torch.device("cpu")))  # fmt: skip
            else:
                r = vqgan_train_step(model, gan, opt_g, opt_d, x, s)
            out.append((r["loss"], r["d_loss"]))
        runs.append((out, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        assert torch.equal(v, runs[1][1][k]), k
