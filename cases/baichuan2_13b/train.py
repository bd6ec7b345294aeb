"""One rank of the Baichuan2 ZeRO-3 case; ``memdiag run`` launches it through torchrun.

    python -m torch.distributed.run --nproc_per_node 2 -m cases.baichuan2_13b.train RUN_DIR

It reads the resolved configuration from ``RUN_DIR/run.json``, starts memdiag's
instrumentation before anything heavy is imported, and trains with DeepSpeed. Phases outside
DeepSpeed's own calls (``init``, ``model_build``, ``teardown``) are marked here; the rest come
from memdiag's DeepSpeed hooks.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from memdiag import instrument
from memdiag.config import RunConfig, load_ds_config
from memdiag.loading import release_freed_memory
from memdiag.phases import PhaseTracker, StepRecord

log = logging.getLogger("memdiag.case")


TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def build_model(config: RunConfig, ds_config: dict, run_name: str):
    """``zero_init``: parameters partitioned as they are created, a checkpoint scattered one
    tensor at a time (memdiag.loading). ``reference``: what the benchmark does - the whole
    model (fp32 unless load.dtype says otherwise) on every rank, partitioned only later by
    ``deepspeed.initialize``."""
    import contextlib

    import deepspeed
    import torch

    from cases.baichuan2_13b.modeling_baichuan import BaichuanConfig, BaichuanForCausalLM
    from memdiag import loading

    model_cfg = BaichuanConfig(**{k: v for k, v in config.model.items() if k != "scale"}, attention=config.attention_path)
    if config.load == "reference":
        dtype = getattr(torch, TORCH_DTYPES[config.load_dtype or "fp32"])
        slots = (
            loading.node_slots(run_name, config.load_concurrency)
            if config.load_concurrency
            else contextlib.nullcontext()
        )
        with slots:
            if config.checkpoint:
                model_cfg = BaichuanConfig.from_pretrained(config.checkpoint, attention=config.attention_path)
                return BaichuanForCausalLM.from_pretrained(config.checkpoint, config=model_cfg, dtype=dtype)
            return BaichuanForCausalLM(model_cfg).to(dtype)
    dtype = getattr(torch, TORCH_DTYPES[config.load_dtype or config.dtype])
    if config.checkpoint:
        return loading.load_zero3(
            BaichuanForCausalLM, config.checkpoint, ds_config, dtype=dtype, trim=False,
            concurrency=config.load_concurrency, lock_name=run_name, attention=config.attention_path,
        )
    with loading.lean_allocator(), deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=dtype):
        return BaichuanForCausalLM(model_cfg)  # random init: every element is written anyway


OPTIMIZER_KWARGS = {"auto": {}, "fused": {"fused": True}, "torch_foreach": {"foreach": True}, "torch_for_loop": {"foreach": False}}
"""``optimizer=`` as torch's AdamW takes it (auto: torch's own default for the device)."""


def make_optimizer(model, ds_config: dict, optimizer: str = "auto"):
    """torch's AdamW with the ds_config's settings: DeepSpeed's own AdamW would JIT-compile
    FusedAdam (~50 s on CPU) and needs a compiler on every node. ``optimizer=fused`` is torch's
    fused kernel, which updates in place as FusedAdam does."""
    import torch

    params = dict(ds_config.pop("optimizer", {}).get("params", {}))
    ds_config["zero_allow_untested_optimizer"] = True
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    return torch.optim.AdamW(model.parameters(), **params, **OPTIMIZER_KWARGS[optimizer])


def _redirect_output(log_path: Path) -> int:
    """Send this rank's stdout/stderr (DeepSpeed's chatter) to its log file; return a
    descriptor of the original stdout for rank 0's progress lines."""
    progress_fd = os.dup(1)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return progress_fd


class Progress:
    """One plain line per step on rank 0: safe to interleave with other logs and to pipe."""

    def __init__(self, fd: int, total_steps: int, memory=None) -> None:
        self._out = os.fdopen(fd, "w", buffering=1)
        self.total = total_steps
        self.memory = memory
        """Returns rank 0's memory now, as text (host RSS; the device's allocated bytes too)."""
        self._times: list[float] = []

    def __call__(self, record: StepRecord) -> None:
        loss = "n/a" if record.loss is None else f"{record.loss:.4f}"
        rate = record.tokens / record.step_time_s if record.step_time_s > 0 else 0.0
        self._times.append(record.step_time_s)
        steady = self._times[1:] or self._times  # the first step warms up
        eta_s = sum(steady) / len(steady) * (self.total - record.step)
        memory = f"  {self.memory()}" if self.memory else ""
        self._out.write(
            f"[memdiag] step {record.step}/{self.total}  loss {loss}  "
            f"{record.step_time_s:.2f} s/step  {rate:,.0f} tokens/s on rank 0{memory}  ETA {eta_s:,.0f} s\n"
        )

    def line(self, text: str) -> None:
        self._out.write(f"[memdiag] {text}\n")


def _memory_text(tracker: PhaseTracker):
    from memdiag.units import format_bytes

    def text() -> str:
        try:
            host = f"host {format_bytes(tracker.read_rss())}"
            device = tracker.device
            if device is not None and not device.is_host_memory:
                return f"{host}, device {format_bytes(device.read(with_nvml=False).allocated_bytes)}"
            return host
        except Exception:  # a progress line never stops training
            return ""

    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # the deepspeed launcher adds --local_rank=N; LOCAL_RANK in the environment says the same
    run_dir = Path(next(a for a in argv if not a.startswith("--local_rank")))
    config = RunConfig.from_dict(json.loads((run_dir / "run.json").read_text())["config"])
    identity = instrument.RankIdentity.from_env()
    inst = None
    if config.instrument:
        inst = instrument.start(run_dir, config)
        tracker = inst.tracker
    else:
        tracker = PhaseTracker(lambda record: None)  # phase scopes only; nothing recorded
    rank = identity.rank
    progress_fd = _redirect_output(run_dir / "logs" / f"rank-{rank}.log")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    progress = Progress(progress_fd, config.steps, memory=_memory_text(tracker)) if rank == 0 else None

    with tracker.phase_scope("init"):
        import torch

        import deepspeed
        from cases.baichuan2_13b import modeling_baichuan  # noqa: F401  (import cost belongs here)

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        backend = "gloo" if config.hardware.accelerator == "cpu" else "nccl"
        deepspeed.init_distributed(dist_backend=backend)
        if config.hardware.accelerator == "cuda":
            torch.cuda.set_device(identity.local_rank)
        torch.manual_seed(config.seed)
        ds_config = load_ds_config(config)

    from cases.baichuan2_13b.data import batches

    data = batches(
        source=config.data["source"],
        path=config.data.get("path"),
        seed=config.data.get("seed", 0),
        seq_len=config.seq_len,
        vocab_size=config.model["vocab_size"],
        micro_batch=config.micro_batch,
        rank=rank,
        world_size=identity.world_size,
    )
    with tracker.phase_scope("model_build"):
        model = build_model(config, ds_config, run_dir.name)
        if config.activation_checkpointing:
            model.gradient_checkpointing_enable()
        if config.load_trim:
            release_freed_memory()
    optimizer = make_optimizer(model, ds_config, config.optimizer)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if config.load_trim:
        rss_before = tracker.read_rss()
        release_freed_memory()
        if inst is not None:
            inst.record_malloc("load_trim", rss_before_trim_bytes=rss_before)
    if progress:
        progress.line(f"training {config.steps} steps on {identity.world_size} ranks")

    engine.train()
    device = engine.device
    step_times_s, step_modes = [], []
    leaked = []  # inject_leak_mb: what a careless training loop keeps alive
    for step in range(config.steps):
        memdiag_on = True
        if config.overhead_ab and inst is not None:
            memdiag_on = (step // config.overhead_ab) % 2 == 1
            inst.set_active(memdiag_on)
        started = time.perf_counter()
        tokens, losses = 0, []
        for _ in range(config.grad_accum):
            input_ids = next(data).to(device)
            loss = engine(input_ids=input_ids, labels=input_ids).loss
            engine.backward(loss)
            engine.step()
            tokens += input_ids.numel()
            losses.append(loss.detach())
        step_times_s.append(time.perf_counter() - started)
        step_modes.append("on" if memdiag_on and inst is not None else "off")
        if config.inject_leak_mb:
            leaked.append(torch.ones(config.inject_leak_mb * 2**20, dtype=torch.uint8))
        if progress:
            mean_loss = float(sum(float(x) for x in losses) / len(losses))
            progress(StepRecord(step=step + 1, loss=mean_loss, tokens=tokens, step_time_s=step_times_s[-1]))
    if config.save or config.resume:
        # the hooks scope these as the checkpoint_save / checkpoint_load phases the plan judges
        checkpoint_dir = str(run_dir / "checkpoint")
        engine.save_checkpoint(checkpoint_dir)
        if config.resume:
            # the case reads back the checkpoint it has just written (trusted); older DeepSpeed
            # calls torch.load without weights_only, which torch >= 2.6 turns on by default
            previous = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
            try:
                engine.load_checkpoint(checkpoint_dir)
            finally:
                if previous is None:
                    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
                else:
                    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = previous
        if progress:
            progress.line("saved a checkpoint" + (" and resumed from it" if config.resume else ""))
    # the case's own clock, the same with and without memdiag (bench/overhead compares them)
    if inst is not None:
        inst.set_active(True)
    try:
        (run_dir / "logs" / f"step_times-rank-{rank}.json").write_text(
            json.dumps({"step_time_s": step_times_s, "memdiag": step_modes})
        )
    except OSError as exc:  # a full disk costs this file, never the run
        logging.getLogger(__name__).warning("step times not written: %s", exc)

    with tracker.phase_scope("teardown"):
        del engine, optimizer, model, leaked
        import gc

        gc.collect()
        deepspeed.comm.barrier()
        torch.distributed.destroy_process_group()
    instrument.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
