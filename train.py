"""Train a GEB model: `python train.py`, `torchrun --standalone --nproc_per_node=2 train.py` (CPU, Gloo) or
`torchrun --nproc_per_node=8 train.py` (GPU, NCCL). Flags: `python train.py --help`."""

import argparse
import json
import math
import os
import platform
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from geb.checkpoint import TOKENIZER_FILE, CheckpointError, load_latest, save_checkpoint
from geb.config import PRESETS, ModelConfig, preset
from geb.model import GEB

DEFAULT_DATA = "data/default"


@dataclass
class TrainConfig:
    preset: str = "tiny"
    data: str = DEFAULT_DATA  # prepared shard dir; the default corpus is prepared here when missing
    out: str = "out/tiny"
    max_steps: int = 240  # length of the lr schedule
    run_steps: int = 0  # stop after this many steps in this invocation (0 = run to max_steps), schedule unchanged
    batch_size: int = 8  # sequences per micro-batch per rank
    seq_len: int = 0  # 0 = the model's max_seq_len
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1337
    save_every: int = 100
    keep_checkpoints: int = 3
    eval_every: int = 120
    eval_tokens: int = 0  # val tokens scored at each periodic evaluation (0 = the whole split)
    log_every: int = 10
    resume: bool = True  # continue from the newest checkpoint in --out when there is one
    compile: bool = False
    zero: bool = False  # shard AdamW state across ranks (ZeroRedundancyOptimizer)
    # GEB's loss-spike countermeasures
    spike_factor: float = 3.0  # replace a micro-batch whose loss > factor x running mean (0 = off)
    max_replacements: int = 4  # per micro-step
    embed_grad_scale: float = 1.0  # GLM-style shrink of the embedding gradient (1 = off, GLM used 0.1)
    embed_grad_scale_steps: int = 0  # ... for this many early steps
    skip_nonfinite: bool = True  # skip the optimizer step when the gradient norm is inf/nan
    eval_tasks: str = ""  # comma-separated multiple-choice tasks to run at the end (see geb.eval)
    eval_tasks_limit: int = 500
    debug_bad_batch_steps: str = ""  # testing: comma-separated steps whose first micro-batch gets a NaN loss


MODEL_OVERRIDES = ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len", "norm_eps", "rope_theta",
                   "tie_embeddings", "norm_position", "dropout")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
                   "4090": 165e12, "A10": 125e12}


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, dict]:
    """TrainConfig and the model-field overrides from the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(TrainConfig):
        kind = parse_bool if f.type is bool else f.type
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default, metavar=f.type.__name__
                            if f.type is not bool else "BOOL", nargs="?" if f.type is bool else None,
                            const=True if f.type is bool else None)
    model_fields = {f.name: f for f in fields(ModelConfig)}
    group = parser.add_argument_group("model overrides of the preset")
    for name in MODEL_OVERRIDES:
        kind = model_fields[name].type
        group.add_argument(f"--{name.replace('_', '-')}", type=parse_bool if kind is bool else kind, default=None)
    args = vars(parser.parse_args(argv))
    overrides = {k: args.pop(k) for k in MODEL_OVERRIDES if args.get(k) is not None}
    for k in MODEL_OVERRIDES:
        args.pop(k, None)
    return TrainConfig(**args), overrides


def fail(message: str) -> None:
    """One-line error on rank 0 and a non-zero exit on every rank."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (linear and embedding weights), none on norm weights."""
    return [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records past the resumed step so metrics.jsonl reads like one uninterrupted run."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= last_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def setup_distributed() -> tuple[int, int, int, torch.device]:
    """rank, local rank, world size and device; initialises the process group under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # Split the cores between the ranks on this machine; oversubscription makes CPU DDP crawl.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return rank, local_rank, world_size, device


def ensure_data(cfg: TrainConfig, rank: int, world_size: int) -> dict:
    """The data manifest; the default corpus is prepared by rank 0 when it is missing."""
    from geb.data import DataError, prepare, read_manifest
    manifest_path = Path(cfg.data) / "manifest.json"
    if not manifest_path.exists():
        if os.path.normpath(cfg.data) != os.path.normpath(DEFAULT_DATA):
            fail(f"--data {cfg.data}: no manifest.json there; prepare it with `python -m geb.data prepare "
                 f"--out {cfg.data} --corpus PATH ...`")
        if rank == 0:
            print(f"preparing the default corpus in {cfg.data} (once)", flush=True)
            prepare(cfg.data)
        if world_size > 1:
            dist.barrier()
    try:
        return read_manifest(cfg.data)
    except DataError as e:
        fail(str(e))


def check_across_ranks(tensor: torch.Tensor, world_size: int) -> bool:
    """Whether a fingerprint tensor is identical on every rank."""
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def fingerprint(tensors) -> torch.Tensor:
    """A float64 checksum that differs when any element differs (in practice)."""
    total = torch.zeros(2, dtype=torch.float64)
    for i, t in enumerate(tensors):
        flat = t.detach().double().flatten().cpu()
        weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64)
        total += torch.stack([flat.sum(), (flat * weights).sum() * (i + 1)])
    return total


def gpu_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def main(argv: list[str] | None = None) -> None:
    cfg, overrides = parse_args(argv)
    if cfg.preset not in PRESETS:
        fail(f"--preset {cfg.preset!r} is unknown; choose one of {sorted(PRESETS)}")
    for name in ("max_steps", "batch_size", "grad_accum", "save_every", "eval_every", "log_every"):
        if getattr(cfg, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    rank, local_rank, world_size, device = setup_distributed()
    master = rank == 0
    out = Path(cfg.out)

    manifest = ensure_data(cfg, rank, world_size)
    try:
        model_config = preset(cfg.preset, vocab_size=manifest["vocab_size"], **overrides)
    except ValueError as e:
        fail(str(e))
    seq_len = cfg.seq_len or model_config.max_seq_len
    if seq_len > model_config.max_seq_len:
        fail(f"--seq-len {seq_len} exceeds the model's context (max_seq_len {model_config.max_seq_len})")
    tokenizer_path = Path(cfg.data) / TOKENIZER_FILE
    tokenizer_sha = manifest["tokenizer_sha256"]

    # Resume state is read before anything random happens, so a resumed run starts from identical state.
    resume_state = None
    if cfg.resume:
        latest = load_latest(out)
        if latest is not None:
            resume_path, resume_state = latest
            if resume_state.get("tokenizer_sha256") != tokenizer_sha:
                fail(f"{resume_path}: checkpoint was trained with another tokenizer than {tokenizer_path}")
            model_config = ModelConfig.from_dict(resume_state["model_config"])
            if model_config.vocab_size != manifest["vocab_size"]:
                fail(f"{resume_path}: model vocab {model_config.vocab_size} != {cfg.data} vocab "
                     f"{manifest['vocab_size']}; use the data it was trained on or a new --out")
            if master:
                print(f"resuming from {resume_path} (step {resume_state['step']})", flush=True)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = GEB(model_config).to(device)
    from geb.loader import TokenLoader
    loader = TokenLoader(cfg.data, "train", seq_len, cfg.batch_size, rank=rank, world_size=world_size, seed=cfg.seed,
                         model_vocab_size=model_config.vocab_size)

    groups = param_groups(model, cfg.weight_decay)
    adam_kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)  # fused AdamW runs on CPU and CUDA
    if cfg.zero and world_size > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        # ZeroRedundancyOptimizer takes one group at construction; the no-decay group is added after.
        optimizer = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=torch.optim.AdamW,
                                            weight_decay=cfg.weight_decay, **adam_kwargs)
        optimizer.add_param_group(groups[1])
    else:
        optimizer = torch.optim.AdamW(groups, **adam_kwargs)

    step, loss_ema, counters = 0, None, {"spikes_replaced": 0, "steps_skipped": 0}
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        step, loss_ema = resume_state["step"], resume_state["loss_ema"]
        counters = dict(resume_state["counters"])
        # The loader state is global (the same on every rank), so it re-shards exactly onto another world size.
        loader.load_state_dict(resume_state["loader"])
        ranks_saved = len(resume_state["rng"])
        if ranks_saved == world_size:
            rng = resume_state["rng"][rank]
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if device.type == "cuda" and rng.get("cuda") is not None:
                torch.cuda.set_rng_state(rng["cuda"], device)
        else:
            torch.manual_seed(cfg.seed + 1000003 * step + rank)  # dropout streams cannot carry over; data order does
            if master:
                print(f"warning: checkpoint was written by {ranks_saved} ranks, this run has {world_size}: data order "
                      "continues exactly, dropout random streams restart", flush=True)

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    writer = None
    if master:
        out.mkdir(parents=True, exist_ok=True)
        run_info = {"train": asdict(cfg), "model": model_config.to_dict(), "params": raw_model.num_params(),
                    "world_size": world_size, "device": str(device), "seq_len": seq_len,
                    "tokens_per_step": cfg.batch_size * seq_len * cfg.grad_accum * world_size,
                    "data_manifest": str(Path(cfg.data) / "manifest.json"), "tokenizer_sha256": tokenizer_sha,
                    "versions": {"torch": torch.__version__, "python": platform.python_version()}}
        write_json_atomic(out / "config.json", run_info)
        if not (out / TOKENIZER_FILE).exists():
            tmp = out / f".{TOKENIZER_FILE}.tmp"
            tmp.write_bytes(tokenizer_path.read_bytes())
            os.replace(tmp, out / TOKENIZER_FILE)
        truncate_metrics(out / "metrics.jsonl", step)
        print(json.dumps(run_info), flush=True)
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(out / "tb"), purge_step=step)
    metrics_file = open(out / "metrics.jsonl", "a") if master else None

    def log(record: dict) -> None:
        if not master:
            return
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                writer.add_scalar(key.replace("_", "/", 1) if "/" not in key else key, value, record["step"])

    stop_signal = {"received": None}

    def on_signal(signum, frame):
        stop_signal["received"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def save(at_step: int) -> None:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        if world_size > 1:
            gathered_rng = [None] * world_size
            dist.all_gather_object(gathered_rng, rng)
            if cfg.zero:
                optimizer.consolidate_state_dict(to=0)
        else:
            gathered_rng = [rng]
        if master:
            state = {"model": raw_model.state_dict(), "model_config": model_config.to_dict(),
                     "optimizer": optimizer.state_dict(), "step": at_step, "loss_ema": loss_ema,
                     "counters": counters, "loader": loader.state_dict(), "rng": gathered_rng,
                     "train_config": asdict(cfg), "tokenizer_sha256": tokenizer_sha,
                     "data_dir": str(Path(cfg.data).resolve())}
            path = save_checkpoint(out, at_step, state, keep=cfg.keep_checkpoints)
            print(f"saved {path}", flush=True)
        if world_size > 1:
            dist.barrier()

    def evaluate(at_step: int) -> None:
        from geb.eval import bits_per_byte
        with autocast:
            result = bits_per_byte(raw_model, cfg.data, split="val", seq_len=seq_len, batch_size=cfg.batch_size,
                                   max_tokens=cfg.eval_tokens or None, device=device, rank=rank,
                                   world_size=world_size)
        log({"step": at_step, "val_loss": result["loss"], "val_bpb": result["bpb"]})
        if master:
            print(f"step {at_step}: val loss {result['loss']:.4f}, val bpb {result['bpb']:.4f}", flush=True)

    bad_steps = {int(s) for s in cfg.debug_bad_batch_steps.split(",") if s.strip()}
    flops_per_token = raw_model.flops_per_token(seq_len)
    peak_flops = gpu_peak_flops(device)
    last_stop = cfg.max_steps if not cfg.run_steps else min(cfg.max_steps, step + cfg.run_steps)
    if master and step >= last_stop:
        print(f"{out} is already at step {step} of --max-steps {cfg.max_steps}: nothing to train; raise --max-steps "
              "to continue or pass a new --out", flush=True)
    model.train()
    t_last, tokens_since = time.perf_counter(), 0
    while step < last_stop:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        raw_model.embedding_grad_scale = cfg.embed_grad_scale if step < cfg.embed_grad_scale_steps else 1.0
        loss_sum, replaced = 0.0, 0
        for micro in range(cfg.grad_accum):
            sync = world_size == 1 or micro == cfg.grad_accum - 1
            for attempt in range(cfg.max_replacements + 1):
                inputs, targets = next(loader)
                if world_size > 1 and step == 0 and micro == 0 and attempt == 0:
                    distinct = not check_across_ranks(fingerprint([inputs]).to(device), world_size)
                    if master:
                        print(f"first batch differs across ranks: {distinct}", flush=True)
                inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                with (nullcontext() if sync else model.no_sync()), autocast:
                    _, loss = model(inputs, targets)
                    if step in bad_steps and micro == 0 and attempt == 0:
                        loss = loss * float("nan")
                value = loss.item()
                spike_allowed = cfg.spike_factor > 0 and loss_ema is not None and step >= cfg.warmup_steps
                is_spike = not math.isfinite(value) or (spike_allowed and value > cfg.spike_factor * loss_ema)
                if not is_spike or attempt == cfg.max_replacements:
                    break
                replaced += 1
                print(f"step {step} rank {rank}: micro-batch loss {value:.3g} replaced by the next batch", flush=True)
            with nullcontext() if sync else model.no_sync():
                (loss / cfg.grad_accum).backward()
            loss_sum += value / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip).item()
        if cfg.skip_nonfinite and not math.isfinite(grad_norm):
            counters["steps_skipped"] += 1
            if master:
                print(f"step {step}: gradient norm {grad_norm} is not finite, optimizer step skipped", flush=True)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world_size > 1:
            totals = torch.tensor([loss_sum, replaced], dtype=torch.float64, device=device)
            dist.all_reduce(totals)
            loss_sum, replaced = totals[0].item() / world_size, int(totals[1].item())
        counters["spikes_replaced"] += replaced
        if math.isfinite(loss_sum):
            loss_ema = loss_sum if loss_ema is None else 0.95 * loss_ema + 0.05 * loss_sum
        step += 1
        tokens_since += cfg.batch_size * seq_len * cfg.grad_accum * world_size

        if step % cfg.log_every == 0 or step == last_stop:
            elapsed = time.perf_counter() - t_last
            record = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens_since / elapsed, **counters}
            if peak_flops:
                record["mfu"] = flops_per_token * tokens_since / elapsed / (peak_flops * world_size)
            log(record)
            if master:
                print(f"step {step}/{cfg.max_steps} loss {loss_sum:.4f} lr {lr:.2e} gnorm {grad_norm:.3f} "
                      f"{record['tokens_per_s']:.0f} tok/s" + (f" mfu {record['mfu']:.1%}" if peak_flops else ""),
                      flush=True)
            t_last, tokens_since = time.perf_counter(), 0

        stop = stop_signal["received"] is not None
        if world_size > 1:
            flag = torch.tensor([int(stop)], device=device)
            dist.all_reduce(flag)
            stop = flag.item() > 0
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            evaluate(step)
        if stop or step % cfg.save_every == 0 or step == last_stop:
            save(step)
        if stop:
            if master:
                print(f"stopped by signal at step {step}; checkpoint saved, resume with the same command", flush=True)
            break

    if world_size > 1:
        same = check_across_ranks(fingerprint(raw_model.parameters()).to(device), world_size)
        if master:
            print(f"weights identical across {world_size} ranks: {same}", flush=True)
    if step == cfg.max_steps and cfg.eval_tasks and master:
        from geb.eval import run_tasks
        from geb.tokenizer import Tokenizer
        raw_model.eval()
        results = run_tasks(raw_model, Tokenizer(tokenizer_path), cfg.eval_tasks.split(","),
                            limit=cfg.eval_tasks_limit, device=device)
        for task, metrics in results.items():
            log({"step": step, **{f"eval/{task}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}})
        write_json_atomic(out / "eval_tasks.json", results)
    if master:
        metrics_file.close()
        writer.close()
    if world_size > 1:
        # Every rank reaches this point before any tears down Gloo; a rank exiting early can abort its peer at exit.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    from geb.data import DataError
    try:
        main()
    except (CheckpointError, DataError) as e:
        fail(str(e))
