"""The trainer: ``hyperp-train --config configs/tiny.yaml [--section.key value ...]`` (the console script), or
``python -m hyperp_megatron.train ...``.

Launch it with torchrun, srun (one task per process) or mpiexec; see ``launch/``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from hyperp_megatron import checkpoint as ckpt
from hyperp_megatron import requeue
from hyperp_megatron.cli import quiet_megatron_import_warnings, split_config_arg
from hyperp_megatron.config import Config, ConfigError, check_vocab_size, load_config, validate
from hyperp_megatron.data.tokenizer import load_tokenizer
from hyperp_megatron.derived import DerivedRun, derive, ignored_settings, vocab_change_line, write_derived
from hyperp_megatron.hardware import GpuInfo, mfu_peak
from hyperp_megatron.metrics import MetricsLogger, peak_memory_gib, run_info, wandb_init_args, write_run_files
from hyperp_megatron.monitors import PREFIX as MONITOR_PREFIX
from hyperp_megatron.monitors import NonFiniteTrainingError, SkipCounter, StabilityMonitor
from hyperp_megatron.profiling import StepProfiler
from hyperp_megatron.resilience import EXIT_REQUEUE, PreemptionFlag, weights_digest
from hyperp_megatron.resume import config_changes, find_checkpoint, resume_roots  # noqa: F401 (re-exported)
from hyperp_megatron.run_lock import RunLock, RunLockError

EXIT_NON_FINITE = 3
"""Exit status when training stops on non-finite values (consecutive skipped steps, or a refused checkpoint)."""


@dataclass
class Session:
    """Everything the loop uses, built once by :func:`setup`."""

    cfg: Config
    device: torch.device
    """Where the model, batches and the loop's collectives live (``parallel.decide_device``)."""
    pg_collection: object
    model_chunks: list
    optimizer: object
    runner: object
    tokenizer: object
    datasets: object  # data.datasets.DatasetSplits
    logger: MetricsLogger
    derived: DerivedRun
    """Every derived value (``derived.derive``, once): steps, LR schedule, weight decay, logit multiplier."""
    ignored_settings: list[str]
    """One line per setting without effect in this run (logged as warnings, in ``derived.json``)."""
    gpu: GpuInfo | None
    """This rank's GPU (None on the CPU): the MFU peak and the memory check."""
    start: "Start" = None
    """The checkpoint the run starts from (:func:`_check_before_model`); None: step 0."""


@dataclass
class Start:
    """Where the run starts, decided once before the model is built (rank 0 verifies, every rank learns it)."""

    checkpoint: Path | None = None
    step: int = 0
    damaged: list[Path] = field(default_factory=list)
    """The run's own damaged checkpoints passed over (set aside before training, never overwritten)."""
    changes: dict = field(default_factory=dict)
    """Settings that change the data from here on: ``{key: [saved, now]}`` (warned about, recorded)."""


def _prepare_data(cfg: Config, rank: int):
    """Tokenizer and dataset prefixes: the embedded corpus (prepared by rank 0) or the configured ones."""
    from hyperp_megatron.data.corpus import load_embedded_corpus, prepare_embedded_corpus

    if cfg.data.prefixes:
        return load_tokenizer(cfg.data.tokenizer), cfg.data.prefixes
    if rank == 0:
        prepare_embedded_corpus(cfg.data.cache_dir, cfg.data.embedded_vocab_size)
    dist.barrier()
    corpus = load_embedded_corpus(cfg.data.cache_dir, cfg.data.embedded_vocab_size)
    return load_tokenizer(corpus.tokenizer_dir), [str(corpus.data_prefix)]


def uses_tf32(cfg: Config, device: torch.device) -> bool:
    """TF32 for fp32 matmuls: on a GPU with ``train.tf32``, never under ``train.deterministic``."""
    return device.type == "cuda" and cfg.train.tf32 and not cfg.train.deterministic


def configure_numerics(cfg: Config, device: torch.device) -> None:
    """Process-wide numerics, decided once for the device: deterministic algorithms when
    ``train.deterministic`` (the entry point sets the cuBLAS workspace variable they need before CUDA
    starts) and TF32 for fp32 matmuls / convolutions (:func:`uses_tf32`)."""
    if device.type == "cuda":
        torch.use_deterministic_algorithms(cfg.train.deterministic)
        torch.backends.cudnn.deterministic = cfg.train.deterministic
        torch.backends.cudnn.benchmark = False
        tf32 = uses_tf32(cfg, device)
        torch.set_float32_matmul_precision("high" if tf32 else "highest")  # = cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = tf32


def setup(cfg: Config, world_size: int, rank: int, device: torch.device | None = None,
          launch: dict | None = None) -> Session:
    """Model, optimizer, data and logger for this rank (distributed state already initialized). The run
    directory's files (config.yaml, run_info.json with ``launch``, derived.json) are written once the start
    checkpoint is known to be usable: a refused launch leaves the run directory as it was.

    ``device``: the one :func:`hyperp_megatron.parallel.init_process_group` decided (default: the
    initialized process group's, ``parallel.process_group_device``)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    from hyperp_megatron.data.datasets import build_datasets, num_samples_per_split
    from hyperp_megatron.model.gpt import build_model
    from hyperp_megatron.optim.builder import build_optimizer
    from hyperp_megatron.parallel import describe_gpu, init_model_parallel, process_group_device
    from hyperp_megatron.step import StepRunner

    device = process_group_device() if device is None else torch.device(device)
    configure_numerics(cfg, device)
    pg_collection = init_model_parallel(cfg.parallel, cfg.train.seed, device)
    # Megatron keeps the MoE aux-loss gradient scale in a class attribute: a second run in the same process
    # (coord check, tests) must not inherit the previous run's tensor.
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    tokenizer, prefixes = _prepare_data(cfg, rank)
    vocab_size = cfg.model.vocab_size or tokenizer.vocab_size
    derived = derive(cfg, world_size, vocab_size=vocab_size)
    gpu = describe_gpu(device)
    start = _check_before_model(cfg, derived, tokenizer, prefixes, gpu, world_size)
    ignored = ignored_settings(cfg, derived)
    run_dir = Path(cfg.logging.run_dir)
    if rank == 0:
        write_run_files(run_dir, cfg.to_dict(), run_info(launch))
        write_derived(run_dir, derived, ignored)
    chunks = build_model(cfg, pg_collection, vocab_size, device, logit_multiplier=derived.output_logit_multiplier)
    tf_config = chunks[0].config
    if cfg.train.precision == "bf16":
        chunks = [Float16Module(tf_config, chunk) for chunk in chunks]
    # DP > 1: the gradient all-reduce (reduce-scatter) of each bucket starts during the backward pass of
    # the last micro-batch, as soon as its gradients are ready.
    data_parallel = pg_collection.dp_cp.size() > 1 or pg_collection.expt_dp.size() > 1
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=data_parallel,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer and cfg.optim.name == "adamw",
    )
    chunks = [DistributedDataParallel(tf_config, ddp_config, chunk, pg_collection=pg_collection)
              for chunk in chunks]
    tf_config.no_sync_func = chunks[0].no_sync
    tf_config.finalize_model_grads_func = finalize_model_grads
    optimizer = build_optimizer(cfg, chunks, pg_collection, derived)
    runner = StepRunner(chunks, optimizer, pg_collection, cfg.model.seq_length, cfg.train.micro_batch_size,
                        derived.num_micro_batches, device)
    samples = num_samples_per_split(derived.steps, cfg.train.global_batch_size, 0, cfg.train.eval_iters)
    datasets = build_datasets(
        prefixes, tokenizer, seq_length=cfg.model.seq_length, seed=cfg.train.seed, num_samples=samples,
        cache_dir=Path(cfg.data.cache_dir) / "index_cache", split=cfg.data.split,
        weights=cfg.data.weights or None,
    )
    logger = MetricsLogger(run_dir, derived.steps, enabled=rank == 0, tensorboard=cfg.logging.tensorboard,
                           progress=cfg.logging.progress, wandb=wandb_init_args(cfg.logging, run_dir, cfg.to_dict()))
    return Session(cfg, device, pg_collection, chunks, optimizer, runner, tokenizer, datasets, logger, derived,
                   ignored, gpu, start)


def _data_iterator(s: Session, dataset, consumed_samples: int):
    """Micro-batches of ``dataset`` for this data-parallel rank (pinned for a GPU)."""
    from hyperp_megatron.data.datasets import build_data_iterator

    return build_data_iterator(dataset, consumed_samples=consumed_samples, micro_batch_size=s.cfg.train.micro_batch_size,
                               dp_rank=s.pg_collection.dp.rank(), dp_size=s.pg_collection.dp.size(),
                               pin_memory=s.device.type == "cuda")


def _train_iterator(s: Session, consumed_samples: int):
    return _data_iterator(s, s.datasets.train, consumed_samples)


def evaluate(s: Session) -> float:
    """Validation loss on a fixed set: the first ``eval_iters`` global batches of the valid split."""
    iterator = _data_iterator(s, s.datasets.valid, 0)
    return s.runner.evaluate(iterator, s.cfg.train.eval_iters * s.runner.num_microbatches)


def _checkpoint_extra(s: Session) -> dict:
    return {"config": s.cfg.to_dict(), "derived": s.derived.to_dict(), **run_info()}


def _rng_key(s: Session) -> dict:
    from hyperp_megatron.parallel import layout_key

    return layout_key(s.pg_collection, s.device)


def _summary(d: DerivedRun) -> str:
    """One start-up line of the derived values (all of them are in derived.json and checkpoints)."""
    return (f"[hyperp] rules {d.rules} | N {d.num_params / 1e6:.2f}M (V {d.vocab_size}) | "
            f"tokens {d.tokens:.3g} in {d.steps} steps of {d.batch_tokens} | "
            f"lr {d.lr:.4g} (depth x{d.depth_factor:.3g}, token x{d.token_factor:.3g}, "
            f"batch x{d.batch_factor:.3g}) | train FLOPs {d.train_flops:.3g} | "
            f"memory ~{d.memory.total:.1f} GiB/GPU")


def throughput(tokens_per_s: float, world_size: int, model_flops_per_token: float,
               peak_flops: float | None) -> dict[str, float]:
    """Tokens/s per GPU and, with a peak, MFU = tokens/s per GPU * model FLOPs per token / peak
    (``budget.model_flops_per_token``, ``hardware.mfu_peak``)."""
    per_gpu = tokens_per_s / world_size
    out = {"tokens_per_s_per_gpu": per_gpu}
    if peak_flops:
        out["mfu"] = per_gpu * model_flops_per_token / peak_flops
    return out


def maybe_resume(s: Session) -> ckpt.TrainState:
    start = s.start or Start()
    if start.checkpoint is None:
        return ckpt.TrainState()
    if dist.get_rank() == 0:
        for path in start.damaged:  # a later save of the same step must not overwrite it
            ckpt.set_aside(path, s.logger.message, "damaged; the run resumes from an earlier checkpoint")
        _record_resume(s, start)
    state, _ = ckpt.load(start.checkpoint, s.model_chunks, s.optimizer, rng_key=_rng_key(s), log=s.logger.message)
    s.logger.message(f"[hyperp] resumed from {start.checkpoint} at step {state.step}")
    return state


RESUMES = "resumes.jsonl"
"""One line per resume in the run directory: when, from which checkpoint, and the data settings that changed."""


def _record_resume(s: Session, start: Start) -> None:
    for key, (saved, now) in start.changes.items():
        s.logger.message(f"[hyperp] warning: {key} is {now!r}, the checkpoint's run had {saved!r}: from step "
                         f"{start.step} on this run sees other samples than the original (recorded in {RESUMES})")
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": str(start.checkpoint),
              "step": start.step, "changed": start.changes}
    with (Path(s.cfg.logging.run_dir) / RESUMES).open("a") as handle:
        handle.write(json.dumps(record) + "\n")


class RunFinished(Exception):
    """The run's checkpoint is already at (or past) ``train.steps``: nothing to train."""


def _check_before_model(cfg: Config, derived: DerivedRun, tokenizer, prefixes: list[str], gpu: GpuInfo | None = None,
                        world_size: int = 1) -> Start:
    """Checks that need the prepared data, run on every rank before any model is built: ConfigError for a
    bad value or a run that does not fit the GPU (``train.memory_check``, ``memory_fit``), CheckpointError when
    no checkpoint can be safely resumed (:func:`_find_start`), RunFinished when resuming would leave no step to
    train (``derived.steps``). Returns where the run starts."""
    from hyperp_megatron.data.datasets import check_data_files, check_split_documents
    from hyperp_megatron.data.metadata import check_tokenizer_matches
    from hyperp_megatron.memory_fit import does_not_fit_line

    check_vocab_size(cfg, tokenizer.vocab_size)
    if gpu is not None and cfg.train.memory_check:
        line = does_not_fit_line(cfg, derived, gpu.memory_gib, gpu.name, world_size)
        if line:
            raise ConfigError(line)
    for prefix in prefixes:
        try:
            check_data_files(prefix)
        except ValueError as exc:
            raise ConfigError(f"data.prefixes: {exc}") from None
        try:
            check_tokenizer_matches(prefix, tokenizer)  # hyperp-preprocess's sidecar, when there is one
        except ValueError as exc:
            raise ConfigError(f"data.tokenizer: {exc}") from None
        try:
            check_split_documents(prefix, cfg.data.split)
        except ValueError as exc:
            raise ConfigError(f"data.split: {exc}") from None
    start = _find_start(cfg)
    if start.checkpoint is None or start.step < derived.steps:
        return start
    steps = (f"train.steps {derived.steps}" if derived.steps == cfg.train.steps
             else f"the run's {derived.steps} steps (from hyperp.default_tokens)")
    raise RunFinished(f"run already at step {start.step} >= {steps}: nothing to do (raise train.steps to continue)")


def _find_start(cfg: Config) -> Start:
    """:func:`find_checkpoint` and :func:`config_changes` on rank 0 (it hashes the checkpoint's files once), the
    verdict broadcast to every rank (world), so that all ranks go on or all raise the same CheckpointError."""
    verdict: list = [None]
    if dist.get_rank() == 0:
        try:
            damaged: list[Path] = []
            found = find_checkpoint(cfg, damaged=damaged)
            start = Start(found, damaged=damaged)
            if found is not None:
                meta = json.loads((found / ckpt.STATE).read_text())
                start.step = int(meta["train_state"]["step"])
                start.changes = config_changes(cfg, meta, found)
            verdict[0] = start
        except ckpt.CheckpointError as exc:
            verdict[0] = str(exc)
    dist.broadcast_object_list(verdict, src=0)
    if isinstance(verdict[0], str):
        raise ckpt.CheckpointError(verdict[0])
    return verdict[0]


def train(cfg: Config, world_size: int, rank: int, preemption: PreemptionFlag | None = None,
          device: torch.device | None = None, launch: dict | None = None) -> dict:
    """Train for the run's ``derived.steps`` optimizer steps on ``device`` (see :func:`setup`); returns the final
    metrics (on every rank).

    With a ``preemption`` flag, a signal on any rank stops all ranks after the same step with a checkpoint
    (``result["preempted"]``). ``launch``: how the job was started, recorded in ``run_info.json``.
    """
    from hyperp_megatron.optim.builder import set_learning_rate

    s = setup(cfg, world_size, rank, device, launch)
    t, steps, ckpt_root = cfg.train, s.derived.steps, Path(cfg.logging.run_dir) / "checkpoints"
    s.logger.message(_summary(s.derived))
    for line in s.ignored_settings + list(filter(None, [vocab_change_line(s.derived)])):
        s.logger.message(f"[hyperp] warning: {line}")
    peak_flops, peak_source = mfu_peak(s.gpu)
    s.logger.message(f"[hyperp] MFU: {peak_source}; model FLOPs/token {s.derived.model_flops_per_token:.4g} "
                     "(6 N without the input embedding + causal attention, budget.model_flops_per_token)")
    state = maybe_resume(s)
    data_iterator = _train_iterator(s, state.consumed_samples)
    s.logger.start(state.step)
    result: dict = {"first_val_loss": None, "val_loss": None, "loss": None, "losses": [], "preempted": False}
    if state.step == 0 and t.eval_interval > 0:
        result["first_val_loss"] = evaluate(s)
        s.logger.log(0, {"val_loss": result["first_val_loss"]})
    monitor = StabilityMonitor(cfg.monitor, cfg.model, s.model_chunks, s.optimizer, s.pg_collection)
    skips = SkipCounter(cfg.monitor.max_consecutive_skips)
    profiler = StepProfiler(t.profile_steps, Path(cfg.logging.run_dir), rank, s.device)
    saver = ckpt.AsyncSaver(s.logger.message) if cfg.checkpoint.async_save else None
    while state.step < steps:
        if saver is not None:
            saver.poll()  # publishes a background save once every rank's writer has finished (collective)
        lr = s.derived.lr_at(state.step)
        set_learning_rate(s.optimizer, lr)
        started = time.perf_counter()
        with profiler.step(state.step + 1):
            metrics = s.runner.train_step(data_iterator, monitor if monitor.is_due(state.step + 1) else None,
                                          poison_loss=state.step + 1 in cfg.debug.nan_at_steps, preemption=preemption)
        preempted = metrics.pop("preempted")  # agreed by all ranks inside the step's one host read
        state.step += 1
        state.consumed_samples += t.global_batch_size
        step_time = time.perf_counter() - started
        metrics.update(lr=lr, step_time=step_time,
                       tokens_per_s=t.global_batch_size * cfg.model.seq_length / step_time)
        metrics.update(**throughput(metrics["tokens_per_s"], world_size, s.derived.model_flops_per_token,
                                    peak_flops), **peak_memory_gib(s.device))
        result["loss"] = metrics["loss"]
        result["losses"].append(metrics["loss"])
        skipped = metrics.pop("skipped")
        state.skipped_steps += int(skipped)
        metrics["skipped_steps"] = state.skipped_steps
        is_last = state.step == steps
        if (t.eval_interval and state.step % t.eval_interval == 0) or is_last:
            metrics["val_loss"] = result["val_loss"] = evaluate(s)
        s.logger.log(state.step, metrics)
        stop = skips.record(skipped)
        if skipped:
            s.logger.message(f"[hyperp] step {state.step}: non-finite loss or gradient norm; update skipped on "
                             f"every rank ({skips.consecutive} in a row, {state.skipped_steps} in total)")
        if stop:
            profiler.close()
            if saver is not None:
                saver.close()
            s.logger.close()
            raise skips.error(state.step)
        if state.step % t.log_interval == 0 or is_last:
            s.logger.print_progress(state.step, {k: v for k, v in metrics.items()
                                                 if k != "update_successful" and not k.startswith(MONITOR_PREFIX)})
        if (cfg.checkpoint.interval and state.step % cfg.checkpoint.interval == 0) or preempted or (
                is_last and cfg.checkpoint.save_final):
            if saver is not None and not preempted:
                saver.save(ckpt_root, state, s.model_chunks, s.optimizer, _checkpoint_extra(s), cfg.checkpoint.keep,
                           rng_key=_rng_key(s))
            else:  # a preemption checkpoint is written before the process stops (after any save in flight)
                if saver is not None:
                    saver.wait()
                ckpt.save(ckpt_root, state, s.model_chunks, s.optimizer, _checkpoint_extra(s), cfg.checkpoint.keep,
                          rng_key=_rng_key(s))
        if preempted and not is_last:
            s.logger.message(f"[hyperp] preemption signal: stopped after step {state.step}, checkpoint saved")
            result["preempted"] = True
            break
    profiler.close()  # a run that ended inside the profiled steps
    if saver is not None:
        saver.close()  # the end of training waits for the save in flight to be published
    result["skipped_steps"] = state.skipped_steps
    if result["preempted"]:
        s.logger.close()
        return {**result, "step": state.step}
    result["weights_digest"] = weights_digest(s.model_chunks)
    if rank == 0:
        (Path(cfg.logging.run_dir) / "final.json").write_text(json.dumps({**result, "step": state.step}))
    s.logger.close()
    return {**result, "step": state.step}


# ----------------------------------------------------------------------------------------------
# Entry point


def _configure_threads(cfg: Config, local_world_size: int, device: torch.device) -> None:
    if device.type == "cpu":
        threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // max(local_world_size, 1))
        torch.set_num_threads(threads)


def _parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0)
    return split_config_arg(argv)


def _write_preemption_marker(run_dir: Path, step: int, preemption: PreemptionFlag) -> None:
    """``run_dir/preempted.json``: launchers that cannot see the exit status (torchrun) requeue on it."""
    latest = run_dir / "checkpoints" / ckpt.LATEST
    signal_name = signal.Signals(preemption.signum).name if preemption.signum else None
    path = requeue.write_marker(run_dir, step, latest.read_text().strip(), signal_name,
                                requeue.slurm_run_id(os.environ))
    print(f"[hyperp] wrote {path} (step {step})", flush=True)


def _clear_preemption_marker(run_dir: Path) -> None:
    marker = requeue.clear_marker(run_dir)
    if marker is not None:
        print(f"[hyperp] removed {requeue.marker_path(run_dir)} (preempted at step {marker.get('step')})",
              flush=True)


ERROR_GRACE_S = 5.0
"""How long a rank other than 0 waits before it exits on an error every rank finds: a launcher such as torchrun
stops the remaining workers as soon as one exits, which could kill rank 0 before it prints the error line."""


def _report_error(rank: int, exc: Exception, code: int) -> int:
    """One ``error:`` line from rank 0; the other ranks leave it time to print (see ``ERROR_GRACE_S``)."""
    if rank == 0:
        print(f"error: {exc}", file=sys.stderr, flush=True)
    else:
        time.sleep(ERROR_GRACE_S)
    return code


def main(argv: list[str] | None = None) -> int:
    """Validate everything first (one-line errors on rank 0 only), then train."""
    quiet_megatron_import_warnings()  # importing this module imports no megatron: the filters come first
    from hyperp_megatron.parallel import decide_device, destroy, discover_launch_env, init_process_group

    try:
        env = discover_launch_env(os.environ)
    except ValueError as exc:  # which process is rank 0 is unknown: each one says it
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        config_path, overrides = _parse_args(sys.argv[1:] if argv is None else argv)
        cfg = load_config(config_path, overrides)
        validate(cfg, env.world_size)
        device = decide_device(cfg.parallel, env.local_rank)
        from hyperp_megatron.model.gpt import check_device_support

        check_device_support(cfg, device)
    except ValueError as exc:
        return _report_error(env.rank, exc, 2)
    if cfg.train.deterministic and device.type == "cuda":
        # Read by cuBLAS when it creates its handles (before the first GEMM) and by TE's attention.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        os.environ.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")
    _configure_threads(cfg, env.local_world_size, device)
    from hyperp_megatron.compat import apply_patches

    if "cpu" in apply_patches(device) and env.rank == 0:
        print("[hyperp] device cpu: running megatron-core on the CPU with gloo "
              "(Transformer Engine/apex unused, local layers)", flush=True)
    init_process_group(env, cfg.parallel, device)
    try:
        lock = _lock_run_dir(cfg, env.rank)
    except RunLockError as exc:
        destroy()
        return _report_error(env.rank, exc, 2)
    if env.rank == 0:
        _clear_preemption_marker(Path(cfg.logging.run_dir))
    preemption = PreemptionFlag().install()
    try:
        result = train(cfg, env.world_size, env.rank, preemption, device,
                       launch={"world_size": env.world_size, "launcher": env.launcher})
        if result["preempted"]:
            if env.rank == 0:  # every rank has passed the checkpoint's last barrier: it is complete
                _write_preemption_marker(Path(cfg.logging.run_dir), result["step"], preemption)
            return EXIT_REQUEUE
    except RunFinished as exc:
        if env.rank == 0:
            print(f"[hyperp] {exc}", flush=True)
        return 0
    except (ConfigError, ckpt.CheckpointError) as exc:  # checks after data preparation; a failed save
        return _report_error(env.rank, exc, 2)
    except (NonFiniteTrainingError, ckpt.NonFiniteStateError) as exc:
        return _report_error(env.rank, exc, EXIT_NON_FINITE)
    else:
        if env.rank == 0:
            print(f"[hyperp] done: step {result['step']} loss {result['loss']:.4f} "
                  f"val_loss {result['val_loss']:.4f} (first val_loss {result['first_val_loss']})", flush=True)
    finally:
        destroy()
        if lock is not None:
            lock.release()
    return 0


def _lock_run_dir(cfg: Config, rank: int) -> RunLock | None:
    """Rank 0 locks the run directory before anything is written there (``run_lock``); every rank learns the
    verdict (world broadcast), so a refused job stops on every node. Returns rank 0's lock (None elsewhere)."""
    lock, verdict = None, [None]
    if rank == 0:
        try:
            lock = RunLock(Path(cfg.logging.run_dir)).acquire()
        except RunLockError as exc:
            verdict[0] = str(exc)
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise RunLockError(verdict[0])
    return lock


if __name__ == "__main__":
    sys.exit(main())
