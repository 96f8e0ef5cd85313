"""Train a GEB model: `python train.py`, `torchrun --standalone --nproc_per_node=2 train.py` (CPU, Gloo) or
`torchrun --nproc_per_node=8 train.py` (GPU, NCCL). Flags: `python train.py --help`."""

import argparse
import gc
import json
import math
import os
import platform
import random
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import TextIO

import torch
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as dcp_state
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter

from geb.align_loader import (
    PreferenceLoader,
    SFTLoader,
    preference_eval_batches,
    read_align_manifest,
    sft_eval_batches,
)
from geb.bpb import bits_per_byte
from geb.chat import IGNORE_INDEX, dpo_loss, sequence_logps, sft_loss
from geb.checkpoint import (
    TOKENIZER_FILE,
    CheckpointError,
    load_latest,
    load_model,
    load_sharded_tensors,
    save_checkpoint,
    save_sharded_checkpoint,
)
from geb.config import PRESETS, ModelConfig, preset
from geb.corpus import DataError
from geb.data import prepare
from geb.files import atomic_copy, atomic_write_json, atomic_write_text, file_sha256
from geb.loader import TokenLoader, read_manifest
from geb.model import GEB
from geb.parallelize import AC_MODES, parallelize
from geb.tasks import run_tasks
from geb.tokenizer import Tokenizer

DEFAULT_DATA = "data/default"
LOSSES = ("fused", "full")  # --loss full is the baseline the fused (logits-free) loss is measured against
STAGES = ("pretrain", "sft", "dpo")
STAGE_DATA = {"sft": "chat", "dpo": "preference"}  # the prepared format each alignment stage reads
DPO_METRICS = ("reward_chosen", "reward_rejected", "reward_accuracy", "reward_margin")


@dataclass
class TrainConfig:
    stage: str = "pretrain"  # pretrain, sft (prompt-masked fine-tuning) or dpo (preference optimisation)
    init: str = ""  # sft/dpo: the model to start from (run dir, checkpoint file or HF Llama dir); dpo's reference
    dpo_beta: float = 0.1  # dpo: strength of the KL constraint to the reference model
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
    fsdp: bool = False  # shard parameters, gradients and AdamW state across ranks (FSDP2); sharded checkpoints
    ac: str = "none"  # activation checkpointing: none, full (every block) or selective (every 2nd block)
    doc_mask: bool = False  # attention within each packed document (RoPE positions restart there), train and eval
    loss: str = "fused"  # fused: chunked linear cross-entropy, no full logits; full: F.cross_entropy on all logits
    # GEB's loss-spike countermeasures
    spike_factor: float = 3.0  # replace a micro-batch whose loss > factor x running mean (0 = off)
    max_replacements: int = 4  # per micro-step
    embed_grad_scale: float = 1.0  # GLM-style shrink of the embedding gradient (1 = off, GLM used 0.1)
    embed_grad_scale_steps: int = 0  # ... for this many early steps
    skip_nonfinite: bool = True  # skip the optimizer step when the gradient norm is inf/nan
    eval_tasks: str = ""  # comma-separated multiple-choice tasks to run at the end (see geb.tasks)
    eval_tasks_limit: int = 500
    debug_bad_batch_steps: str = ""  # testing: comma-separated steps whose first micro-batch gets a NaN loss


MODEL_OVERRIDES = ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len", "norm_eps", "rope_theta",
                   "tie_embeddings", "norm_position", "dropout")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
                   "4090": 165e12, "A10": 125e12}


@dataclass
class TrainState:
    """A run's progress, carried by every checkpoint: the step, the loss EMA spikes are measured against, counters."""

    step: int = 0
    loss_ema: float | None = None
    counters: dict[str, int] = field(default_factory=lambda: {"spikes_replaced": 0, "steps_skipped": 0})


class EmbeddingGradShrink:
    """GLM-style shrink of the embedding gradient: a forward hook on model.embed_tokens that leaves the output as it
    is and multiplies the gradient flowing back into the embedding by `scale` (1 = off; the step sets it)."""

    def __init__(self, model: GEB):
        self.scale = 1.0
        self.handle = model.embed_tokens.register_forward_hook(self)

    def __call__(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.scale == 1.0:
            return None
        return output * self.scale + output.detach() * (1.0 - self.scale)


@dataclass
class Run:
    """The parts of a training run that the step, save, evaluation and logging functions share."""

    cfg: TrainConfig
    model: torch.nn.Module  # what the step calls: raw_model, compiled and/or wrapped in DDP
    raw_model: GEB
    optimizer: torch.optim.Optimizer
    loader: Iterator[tuple[torch.Tensor, torch.Tensor]]  # a TokenLoader in train.py (save needs its state_dict)
    seq_len: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    state: TrainState = field(default_factory=TrainState)
    embedding_shrink: EmbeddingGradShrink | None = None
    tokenizer_sha: str = ""
    metrics_file: TextIO | None = None  # rank 0 only, as is writer
    writer: SummaryWriter | None = None
    reference: GEB | None = None  # dpo: the frozen init model (eval mode, no gradient, not in the optimizer)
    stop_signal: int | None = None  # set by SIGTERM/SIGINT; the run saves and stops after the current step

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def fsdp(self) -> bool:
        """Whether the model is sharded with FSDP2 (--fsdp on more than one rank)."""
        return self.cfg.fsdp and self.world_size > 1


def parse_bool(text: str) -> bool:
    """A boolean flag value: 1/true/yes/on or 0/false/no/off."""
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


def check_flags(cfg: TrainConfig) -> None:
    """Fail on an unknown preset or a count flag that is not positive."""
    if cfg.preset not in PRESETS:
        fail(f"--preset {cfg.preset!r} is unknown; choose one of {sorted(PRESETS)}")
    for name in ("max_steps", "batch_size", "grad_accum", "save_every", "eval_every", "log_every"):
        if getattr(cfg, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.fsdp and cfg.zero:
        fail("--fsdp and --zero are exclusive: --fsdp already shards the optimizer state (and the weights); pick one")
    if cfg.ac not in AC_MODES:
        fail(f"--ac {cfg.ac!r} is unknown; choose one of {', '.join(AC_MODES)}")
    if cfg.loss not in LOSSES:
        fail(f"--loss {cfg.loss!r} is unknown; choose one of {', '.join(LOSSES)}")
    check_stage_flags(cfg)


def check_stage_flags(cfg: TrainConfig) -> None:
    """Fail on an unknown --stage or a flag that does not fit it."""
    if cfg.stage not in STAGES:
        fail(f"--stage {cfg.stage!r} is unknown; choose one of {', '.join(STAGES)}")
    if cfg.stage == "pretrain":
        if cfg.init:
            fail("--init is for --stage sft or dpo; pretraining starts from random weights (resume it from --out)")
        return
    if os.path.normpath(cfg.data) == os.path.normpath(DEFAULT_DATA):
        fail(f"--stage {cfg.stage} needs --data DIR prepared with `python -m geb.data prepare --format "
             f"{STAGE_DATA[cfg.stage]}` (the default data is pretraining text)")
    if cfg.dpo_beta <= 0:
        fail(f"--dpo-beta must be positive, got {cfg.dpo_beta}")
    if cfg.doc_mask:
        fail(f"--doc-mask is for pretraining; --stage {cfg.stage} already keeps attention within each example")
    if cfg.stage == "dpo" and cfg.fsdp:
        fail("--fsdp is not supported with --stage dpo (the frozen reference model is not sharded); use DDP "
             "(optionally --zero)")


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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=elastic_store(world_size),
                                rank=rank, world_size=world_size, device_id=device if device.type == "cuda" else None)
    return rank, local_rank, world_size, device


def elastic_store(world_size: int) -> dist.Store | None:
    """Under torchrun, the agent's store with a prefix per restart round (None elsewhere: init from env://).

    torchrun's agent keeps one TCPStore for the whole job, and env:// hands it to the workers without a per-round
    prefix, so after a restart the previous round's keys are still there: a restarted Gloo rank may read a dead
    peer's address under the same key and fail at once (`connectFullMesh ... Connection refused`, PyTorch 2.13).
    Keying the process group by TORCHELASTIC_RESTART_COUNT gives each round fresh keys; see docs/training.md."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False)
    return dist.PrefixStore(f"geb/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def ensure_data(cfg: TrainConfig, rank: int, world_size: int) -> dict:
    """The data manifest; the default corpus is prepared by rank 0 when it is missing."""
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


def model_config_from_flags(cfg: TrainConfig, manifest: dict, overrides: dict) -> tuple[ModelConfig, int]:
    """The preset with its overrides at the data's vocabulary, and the training sequence length."""
    try:
        model_config = preset(cfg.preset, vocab_size=manifest["vocab_size"], **overrides)
    except ValueError as e:
        fail(str(e))
    seq_len = cfg.seq_len or model_config.max_seq_len
    if seq_len > model_config.max_seq_len:
        fail(f"--seq-len {seq_len} exceeds the model's context (max_seq_len {model_config.max_seq_len})")
    return model_config, seq_len


def read_resume_state(cfg: TrainConfig, manifest: dict, master: bool) -> dict | None:
    """The newest checkpoint in --out (None for a fresh run or --resume false), checked against the data."""
    latest = load_latest(cfg.out, weights=False) if cfg.resume else None
    if latest is None:
        return None
    path, state = latest
    if state.get("tokenizer_sha256") != manifest["tokenizer_sha256"]:
        fail(f"{path}: checkpoint was trained with another tokenizer than {Path(cfg.data) / TOKENIZER_FILE}")
    vocab_size = state["model_config"]["vocab_size"]
    if vocab_size != manifest["vocab_size"]:
        fail(f"{path}: model vocab {vocab_size} != {cfg.data} vocab {manifest['vocab_size']}; use the data it was "
             "trained on or a new --out")
    if state.get("stage", "pretrain") != cfg.stage:
        fail(f"{path}: checkpoint is from --stage {state.get('stage', 'pretrain')}, this run is --stage {cfg.stage}; "
             "pass a new --out (start the next stage with --init)")
    if cfg.fsdp and "model" in state:
        fail(f"{path}: a single-file checkpoint cannot resume under --fsdp; resume it without --fsdp or pass a new "
             "--out")
    if master:
        print(f"resuming from {path} (step {state['step']})", flush=True)
    state["path"] = str(path)
    return state


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (linear and embedding weights), none on norm weights."""
    return [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, world_size: int = 1) -> torch.optim.Optimizer:
    """Fused AdamW (CPU and CUDA) without decay on norm weights; sharded across ranks with --zero."""
    groups = param_groups(model, cfg.weight_decay)
    adam_kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    if not (cfg.zero and world_size > 1):
        return torch.optim.AdamW(groups, **adam_kwargs)
    # ZeroRedundancyOptimizer takes one group at construction; the no-decay group is added after.
    optimizer = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=torch.optim.AdamW,
                                        weight_decay=cfg.weight_decay, **adam_kwargs)
    optimizer.add_param_group(groups[1])
    return optimizer


def wrap_model(model: GEB, cfg: TrainConfig, world_size: int, local_rank: int, device: torch.device
               ) -> torch.nn.Module:
    """What the step calls: under --fsdp the model itself (parallelize made it FSDP); else the model, compiled with
    --compile, in DDP across ranks."""
    if cfg.fsdp and world_size > 1:
        return model
    if cfg.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    return model


def grad_sync(run: Run, sync: bool) -> AbstractContextManager:
    """All-reduce (DDP) or reduce-scatter (FSDP) the gradients in this backward only when sync is true."""
    if run.fsdp:
        run.model.set_requires_gradient_sync(sync)
        return nullcontext()
    return nullcontext() if sync or run.world_size == 1 else run.model.no_sync()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA (fp32 weights and optimizer state); plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


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


def micro_step(run: Run, micro: int, poison_first: bool = False) -> tuple[float, int]:
    """Forward and backward of one micro-batch. A batch whose loss is not finite, or above spike_factor x the loss
    EMA after warmup, is replaced by the next one (at most max_replacements times); returns the loss and the number
    of replacements. Under DDP the gradients are all-reduced on the last micro-step only."""
    cfg, state = run.cfg, run.state
    sync = run.world_size == 1 or micro == cfg.grad_accum - 1
    replaced = 0
    for attempt in range(cfg.max_replacements + 1):
        inputs, targets, *positions = next(run.loader)  # positions with --doc-mask
        if run.world_size > 1 and state.step == 0 and micro == 0 and attempt == 0:
            distinct = not check_across_ranks(fingerprint([inputs]).to(run.device), run.world_size)
            if run.master:
                print(f"first batch differs across ranks: {distinct}", flush=True)
        inputs, targets = inputs.to(run.device, non_blocking=True), targets.to(run.device, non_blocking=True)
        with grad_sync(run, sync), autocast(run.device):
            _, loss = run.model(inputs, targets, logits="none" if run.cfg.loss == "fused" else "all",
                                positions=positions[0].to(run.device) if positions else None)
            if poison_first and attempt == 0:
                loss = loss * float("nan")
        value = loss.item()
        spike_allowed = cfg.spike_factor > 0 and state.loss_ema is not None and state.step >= cfg.warmup_steps
        is_spike = not math.isfinite(value) or (spike_allowed and value > cfg.spike_factor * state.loss_ema)
        if not is_spike or attempt == cfg.max_replacements:
            break
        replaced += 1
        print(f"step {state.step} rank {run.rank}: micro-batch loss {value:.3g} replaced by the next batch", flush=True)
    with grad_sync(run, sync):
        (loss / cfg.grad_accum).backward()
    return value, replaced


# --- alignment stages (sft, dpo): their data, init and reference models, steps and evaluations -----------------------


def align_manifest(cfg: TrainConfig) -> dict:
    """The manifest of an alignment stage's --data (chat for sft, preference for dpo)."""
    try:
        return read_align_manifest(cfg.data, STAGE_DATA[cfg.stage])
    except DataError as e:
        fail(str(e))


def load_init(source: str, manifest: dict, flag: str = "--init") -> GEB:
    """The model an alignment stage starts from (and dpo's reference), checked against the data's tokenizer."""
    try:
        model, tokenizer = load_model(source)
    except (CheckpointError, OSError, ValueError) as e:
        fail(f"{flag} {source}: {e}")
    if tokenizer is not None and file_sha256(tokenizer) != manifest["tokenizer_sha256"]:
        fail(f"{flag} {source}: the model was trained with another tokenizer ({tokenizer}) than --data "
             f"{manifest['data_dir']}; prepare the data with the model's tokenizer")
    if model.config.vocab_size < manifest["vocab_size"]:
        fail(f"{flag} {source}: model vocab {model.config.vocab_size} < --data vocab {manifest['vocab_size']}")
    return model


def setup_alignment(cfg: TrainConfig, overrides: dict, master: bool
                    ) -> tuple[dict, ModelConfig, int, dict | None, GEB | None]:
    """An alignment stage's manifest, model config (the init model's, or the checkpoint's on resume), sequence length,
    resume state and init model (None when resuming sft: the checkpoint holds the weights; dpo's reference is the
    init model recorded in the checkpoint, checked by fingerprint in restore)."""
    if overrides:
        fail(f"--{next(iter(overrides)).replace('_', '-')}: model overrides do not apply to --stage {cfg.stage}; "
             "the init model's config is used")
    manifest = align_manifest(cfg)
    resume_state = read_resume_state(cfg, manifest, master)
    if resume_state is None and not cfg.init:
        fail(f"--stage {cfg.stage} needs --init CKPT (a run dir, checkpoint file or Hugging Face Llama dir)")
    if resume_state is None:
        cfg.init = str(Path(cfg.init).resolve())
    elif master and cfg.init and os.path.abspath(cfg.init) != resume_state["train_config"]["init"]:
        print(f"resuming {cfg.out}: --init {cfg.init} is ignored (the run started from "
              f"{resume_state['train_config']['init']})", flush=True)
    if resume_state is not None:
        cfg.init = resume_state["train_config"]["init"]
    init = load_init(cfg.init, manifest) if resume_state is None or cfg.stage == "dpo" else None
    model_config = init.config if resume_state is None else ModelConfig.from_dict(resume_state["model_config"])
    seq_len = cfg.seq_len or model_config.max_seq_len
    if seq_len > model_config.max_seq_len:
        fail(f"--seq-len {seq_len} exceeds the model's context (max_seq_len {model_config.max_seq_len})")
    if master and manifest["splits"]["val"]["examples"] == 0:
        print(f"note: {cfg.data} has an empty val split; evaluation is skipped", flush=True)
    return manifest, model_config, seq_len, resume_state, init


def make_loader(cfg: TrainConfig, seq_len: int, rank: int, world_size: int, vocab_size: int) -> Iterator:
    """The train split's batches: tokens (pretrain), packed conversations (sft) or preference pairs (dpo)."""
    kind = {"pretrain": TokenLoader, "sft": SFTLoader, "dpo": PreferenceLoader}[cfg.stage]
    try:
        extra = {"doc_mask": cfg.doc_mask} if cfg.stage == "pretrain" else {}
        return kind(cfg.data, "train", seq_len, cfg.batch_size, rank=rank, world_size=world_size, seed=cfg.seed,
                    model_vocab_size=vocab_size, **extra)
    except DataError as e:
        fail(str(e))


def all_reduce_sum(values: list[float], run: Run) -> list[float]:
    """The sums of values over the ranks (float64)."""
    if run.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=run.device)
    dist.all_reduce(t)
    return t.tolist()


def sft_micro_steps(run: Run) -> tuple[float, dict]:
    """Forward and backward of an sft step's grad_accum micro-batches, each loss divided by the assistant tokens of
    the whole global batch (counted before the first forward), so the gradient is that of the global token mean
    however the batch is split. Returns this rank's share of the loss (its mean over ranks is the global loss)."""
    cfg = run.cfg
    batches = [next(run.loader) for _ in range(cfg.grad_accum)]
    n_tokens = all_reduce_sum([sum(int((t != IGNORE_INDEX).sum()) for _, t, _ in batches)], run)[0]
    total = 0.0
    for micro, (inputs, targets, positions) in enumerate(batches):
        sync = run.world_size == 1 or micro == cfg.grad_accum - 1
        with grad_sync(run, sync), autocast(run.device):
            # positions restart at each packed example: attention and RoPE stay within it
            logits, _ = run.model(inputs.to(run.device), positions=positions.to(run.device))
            # DDP and FSDP average gradients over ranks; the world_size factor turns that average into the sum
            loss = sft_loss(logits, targets.to(run.device), max(n_tokens, 1.0)) * run.world_size
            loss.backward()
        total += loss.item()
    return total, {"assistant_tokens": int(n_tokens), "truncated": run.loader.truncated}


def pair_logps(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sequence log-probs of the chosen rows [0, B) and rejected rows [B, 2B) of a preference batch."""
    logps = sequence_logps(model(inputs)[0], targets)
    b = inputs.shape[0] // 2
    return logps[:b], logps[b:]


def dpo_micro_steps(run: Run) -> tuple[float, dict]:
    """Forward and backward of a dpo step's grad_accum micro-batches against the frozen reference; returns this
    rank's mean loss and the step's reward metrics, means over all pairs of the global batch."""
    cfg = run.cfg
    total, sums = 0.0, [0.0] * len(DPO_METRICS)
    for micro in range(cfg.grad_accum):
        inputs, targets = (t.to(run.device) for t in next(run.loader))
        with torch.no_grad(), autocast(run.device):
            ref_chosen, ref_rejected = pair_logps(run.reference, inputs, targets)
        sync = run.world_size == 1 or micro == cfg.grad_accum - 1
        with grad_sync(run, sync), autocast(run.device):
            chosen, rejected = pair_logps(run.model, inputs, targets)
            loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.dpo_beta)
            (loss / cfg.grad_accum).backward()
        total += loss.item() / cfg.grad_accum
        sums = [s + metrics[k].item() for s, k in zip(sums, DPO_METRICS, strict=True)]
    means = [s / (cfg.grad_accum * run.world_size) for s in all_reduce_sum(sums, run)]
    return total, {**dict(zip(DPO_METRICS, means, strict=True)), "truncated": run.loader.truncated}


@torch.no_grad()
def evaluate_alignment(run: Run) -> None:
    """The stage's own held-out evaluation on every rank: sft, the loss on the val split's assistant tokens
    (val_loss); dpo, the reward accuracy and margin on its val pairs (val_reward_accuracy, val_reward_margin)."""
    cfg, model = run.cfg, run.raw_model
    if read_align_manifest(cfg.data, STAGE_DATA[cfg.stage])["splits"]["val"]["examples"] == 0:
        return
    was_training = model.training
    model.eval()
    args = (cfg.data, "val", run.seq_len, cfg.batch_size, run.rank, run.world_size)
    with autocast(run.device):
        if cfg.stage == "sft":
            sums = [0.0, 0.0]
            for inputs, targets, positions in sft_eval_batches(*args):
                logits, _ = model(inputs.to(run.device), positions=positions.to(run.device))
                sums[0] += sft_loss(logits, targets.to(run.device), 1).item()
                sums[1] += int((targets != IGNORE_INDEX).sum())
            nll, n = all_reduce_sum(sums, run)
            record = {"val_loss": nll / max(n, 1)}
        else:
            sums = [0.0, 0.0, 0.0]  # correct pairs, margin sum, pairs
            for inputs, targets, n_pairs in preference_eval_batches(*args):
                inputs, targets = inputs.to(run.device), targets.to(run.device)
                pc, pr = pair_logps(model, inputs, targets)
                rc, rr = pair_logps(run.reference, inputs, targets)
                margin = (cfg.dpo_beta * ((pc - rc) - (pr - rr)))[:n_pairs]
                sums = [sums[0] + (margin > 0).sum().item(), sums[1] + margin.sum().item(), sums[2] + n_pairs]
            correct, margin_sum, n = all_reduce_sum(sums, run)
            record = {"val_reward_accuracy": correct / max(n, 1), "val_reward_margin": margin_sum / max(n, 1)}
    model.train(was_training)
    log(run, {"step": run.state.step, **record})
    if run.master:
        print(f"step {run.state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items()), flush=True)


def train_step(run: Run) -> dict:
    """One optimizer step: this step's lr and embedding-gradient scale, grad_accum micro-steps, gradient clipping and
    the AdamW update (skipped when the gradient norm is not finite). Advances run.state; returns step, loss (mean
    over micro-batches and ranks), lr and grad_norm."""
    cfg, state = run.cfg, run.state
    lr = lr_at(state.step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if run.embedding_shrink is not None:
        run.embedding_shrink.scale = cfg.embed_grad_scale if state.step < cfg.embed_grad_scale_steps else 1.0
    poison = state.step in {int(s) for s in cfg.debug_bad_batch_steps.split(",") if s.strip()}
    loss_sum, replaced, stage_metrics = 0.0, 0, {}
    if cfg.stage == "sft":
        loss_sum, stage_metrics = sft_micro_steps(run)
    elif cfg.stage == "dpo":
        loss_sum, stage_metrics = dpo_micro_steps(run)
    for micro in range(cfg.grad_accum if cfg.stage == "pretrain" else 0):
        value, n = micro_step(run, micro, poison_first=poison and micro == 0)
        loss_sum += value / cfg.grad_accum
        replaced += n
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.grad_clip)
    grad_norm = (grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm).item()
    if cfg.skip_nonfinite and not math.isfinite(grad_norm):
        state.counters["steps_skipped"] += 1
        if run.master:
            print(f"step {state.step}: gradient norm {grad_norm} is not finite, optimizer step skipped", flush=True)
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.world_size > 1:
        totals = torch.tensor([loss_sum, replaced], dtype=torch.float64, device=run.device)
        dist.all_reduce(totals)
        loss_sum, replaced = totals[0].item() / run.world_size, int(totals[1].item())
    state.counters["spikes_replaced"] += replaced
    if math.isfinite(loss_sum):
        state.loss_ema = loss_sum if state.loss_ema is None else 0.95 * state.loss_ema + 0.05 * loss_sum
    state.step += 1
    return {"step": state.step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, **stage_metrics}


def save(run: Run) -> None:
    """Checkpoint the run at its step, with every rank's RNG state (call it on every rank): rank 0 writes one file,
    or, under --fsdp, every rank writes its shards of a checkpoint directory."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None}
    if run.world_size > 1:
        gathered_rng = [None] * run.world_size
        dist.all_gather_object(gathered_rng, rng)
        if run.cfg.zero:
            run.optimizer.consolidate_state_dict(to=0)
    else:
        gathered_rng = [rng]
    state = {"model_config": run.raw_model.config.to_dict(), "step": run.state.step, "loss_ema": run.state.loss_ema,
             "counters": run.state.counters, "loader": run.loader.state_dict(), "rng": gathered_rng,
             "train_config": asdict(run.cfg), "tokenizer_sha256": run.tokenizer_sha,
             "data_dir": str(Path(run.cfg.data).resolve()), "stage": run.cfg.stage}
    if run.reference is not None:  # the reference is the init model: record which, not its weights again
        state["reference_fingerprint"] = fingerprint(run.reference.parameters()).tolist()
    if run.cfg.fsdp:
        model_state, optimizer_state = dcp_state.get_state_dict(run.raw_model, run.optimizer)
        path = save_sharded_checkpoint(run.out, run.state.step, {"model": model_state, "optimizer": optimizer_state},
                                       state if run.master else None, keep=run.cfg.keep_checkpoints)
    elif run.master:
        state.update(model=run.raw_model.state_dict(), optimizer=run.optimizer.state_dict())
        path = save_checkpoint(run.out, run.state.step, state, keep=run.cfg.keep_checkpoints)
    if run.master:
        print(f"saved {path}", flush=True)
    if run.world_size > 1:
        dist.barrier()


def restore(run: Run, state: dict) -> None:
    """Continue from a checkpoint: weights, optimizer, progress, data position and (same world size) RNG streams."""
    if "model" in state:
        run.raw_model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    else:  # sharded: each rank reads its shards of the model and optimizer, whatever world size wrote them
        model_state, optimizer_state = dcp_state.get_state_dict(run.raw_model, run.optimizer)
        tensors = {"model": model_state, "optimizer": optimizer_state}
        load_sharded_tensors(state["path"], tensors)
        dcp_state.set_state_dict(run.raw_model, run.optimizer, model_state_dict=tensors["model"],
                                 optim_state_dict=tensors["optimizer"])
    if run.reference is not None and fingerprint(run.reference.parameters()).tolist() != state["reference_fingerprint"]:
        fail(f"{state['path']}: the reference model {run.cfg.init} has changed since this dpo run started; resume "
             "needs the same init checkpoint")
    run.state = TrainState(state["step"], state["loss_ema"], dict(state["counters"]))
    # The loader state is global (the same on every rank), so it re-shards exactly onto another world size.
    run.loader.load_state_dict(state["loader"])
    ranks_saved = len(state["rng"])
    if ranks_saved == run.world_size:
        rng = state["rng"][run.rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if run.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], run.device)
    else:
        torch.manual_seed(run.cfg.seed + 1000003 * run.state.step + run.rank)  # dropout streams cannot carry over
        if run.master:
            print(f"warning: checkpoint was written by {ranks_saved} ranks, this run has {run.world_size}: data "
                  "order continues exactly, dropout random streams restart", flush=True)


def open_logs(run: Run) -> None:
    """Rank 0: config.json and the tokenizer in --out, metrics.jsonl cut back to the run's step, TensorBoard."""
    if not run.master:
        return
    cfg, out = run.cfg, run.out
    out.mkdir(parents=True, exist_ok=True)
    run_info = {"stage": cfg.stage, "train": asdict(cfg), "model": run.raw_model.config.to_dict(),
                "params": run.raw_model.num_params(),
                "world_size": run.world_size, "device": str(run.device), "seq_len": run.seq_len,
                "tokens_per_step": cfg.batch_size * run.seq_len * cfg.grad_accum * run.world_size,
                "data_manifest": str(Path(cfg.data) / "manifest.json"), "tokenizer_sha256": run.tokenizer_sha,
                "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    atomic_write_json(out / "config.json", run_info)
    if not (out / TOKENIZER_FILE).exists():
        atomic_copy(Path(cfg.data) / TOKENIZER_FILE, out / TOKENIZER_FILE)
    truncate_metrics(out / "metrics.jsonl", run.state.step)
    print(json.dumps(run_info), flush=True)
    run.writer = SummaryWriter(log_dir=str(out / "tb"), purge_step=run.state.step)
    run.metrics_file = open(out / "metrics.jsonl", "a")


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records past the resumed step so metrics.jsonl reads like one uninterrupted run."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def log(run: Run, record: dict) -> None:
    """Rank 0: append a record to metrics.jsonl and its numbers to TensorBoard (`val_loss` as `val/loss`)."""
    if not run.master:
        return
    run.metrics_file.write(json.dumps(record) + "\n")
    run.metrics_file.flush()
    for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
            run.writer.add_scalar(key.replace("_", "/", 1) if "/" not in key else key, value, record["step"])


def gpu_peak_flops(device: torch.device) -> float | None:
    """The datasheet dense bf16 FLOP/s of a known GPU (None on CPU or an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def log_step(run: Run, metrics: dict, tokens: int, elapsed: float) -> None:
    """Log a train step's metrics with the throughput (and MFU on a known GPU) since the last logged step."""
    record = {**metrics, "tokens_per_s": tokens / elapsed, **run.state.counters}
    peak_flops = gpu_peak_flops(run.device)
    if peak_flops:
        flops = run.raw_model.flops_per_token(run.seq_len) * tokens
        record["mfu"] = flops / elapsed / (peak_flops * run.world_size)
    log(run, record)
    if run.master:
        print(f"step {record['step']}/{run.cfg.max_steps} loss {record['loss']:.4f} lr {record['lr']:.2e} gnorm "
              f"{record['grad_norm']:.3f} {record['tokens_per_s']:.0f} tok/s"
              + (f" mfu {record['mfu']:.1%}" if peak_flops else "")
              + "".join(f" {k} {record[k]:.3f}" for k in DPO_METRICS if k in record), flush=True)


def evaluate(run: Run) -> None:
    """Score the val split (its first --eval-tokens tokens) on every rank and log val_loss and val_bpb; an alignment
    stage has its own evaluation (evaluate_alignment)."""
    cfg = run.cfg
    if cfg.stage != "pretrain":
        return evaluate_alignment(run)
    with autocast(run.device):
        result = bits_per_byte(run.raw_model, cfg.data, split="val", seq_len=run.seq_len, batch_size=cfg.batch_size,
                               max_tokens=cfg.eval_tokens or None, device=run.device, rank=run.rank,
                               world_size=run.world_size, doc_mask=cfg.doc_mask)
    log(run, {"step": run.state.step, "val_loss": result["loss"], "val_bpb": result["bpb"]})
    if run.master:
        print(f"step {run.state.step}: val loss {result['loss']:.4f}, val bpb {result['bpb']:.4f}", flush=True)


def evaluate_tasks(run: Run) -> None:
    """Rank 0: the --eval-tasks benchmarks, logged as eval/TASK/METRIC and written to eval_tasks.json."""
    run.raw_model.eval()
    results = run_tasks(run.raw_model, Tokenizer(Path(run.cfg.data) / TOKENIZER_FILE), run.cfg.eval_tasks.split(","),
                        limit=run.cfg.eval_tasks_limit, device=run.device)
    for task, metrics in results.items():
        log(run, {"step": run.state.step, **{f"eval/{task}/{k}": v for k, v in metrics.items()
                                             if isinstance(v, (int, float))}})
    atomic_write_json(run.out / "eval_tasks.json", results)


def request_stop(run: Run, signum: int, frame) -> None:
    """Signal handler: remember the signal; the loop saves and stops at the end of the current step."""
    run.stop_signal = signum


def stop_requested(run: Run) -> bool:
    """Whether any rank has received SIGTERM or SIGINT (every rank gets the same answer)."""
    stop = run.stop_signal is not None
    if run.world_size > 1:
        flag = torch.tensor([int(stop)], device=run.device)
        dist.all_reduce(flag)
        stop = flag.item() > 0
    return stop


def train_loop(run: Run, last_stop: int) -> bool:
    """Train to last_stop, logging every --log-every steps and saving and evaluating at their intervals; the last
    step's checkpoint and evaluation are the caller's. Returns whether a signal stopped the run early."""
    cfg = run.cfg
    run.model.train()
    t_last, tokens = time.perf_counter(), 0
    while run.state.step < last_stop:
        metrics = train_step(run)
        step = run.state.step
        tokens += cfg.batch_size * run.seq_len * cfg.grad_accum * run.world_size * (2 if cfg.stage == "dpo" else 1)
        if step % cfg.log_every == 0 or step == last_stop:
            log_step(run, metrics, tokens, time.perf_counter() - t_last)
            t_last, tokens = time.perf_counter(), 0
        if stop_requested(run):
            return True
        if step == last_stop:
            break
        if step % cfg.save_every == 0:
            save(run)
        if step % cfg.eval_every == 0:
            evaluate(run)
    return False


def finish(run: Run) -> None:
    """Check the ranks ended with identical weights, close the logs and tear down the process group."""
    if run.world_size > 1 and not run.fsdp:  # FSDP ranks hold different shards by design
        same = check_across_ranks(fingerprint(run.raw_model.parameters()).to(run.device), run.world_size)
        if run.master:
            print(f"weights identical across {run.world_size} ranks: {same}", flush=True)
    if run.master:
        run.metrics_file.close()
        run.writer.close()
    if run.world_size > 1:
        # Every rank reaches this point before any tears down Gloo; a rank exiting early can abort its peer at exit.
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """Train as the command line says: python train.py --help."""
    cfg, overrides = parse_args(argv)
    check_flags(cfg)
    rank, local_rank, world_size, device = setup_distributed()
    init = None
    if cfg.stage == "pretrain":
        manifest = ensure_data(cfg, rank, world_size)
        model_config, seq_len = model_config_from_flags(cfg, manifest, overrides)
        resume_state = read_resume_state(cfg, manifest, rank == 0)  # before anything random, for an identical restart
        if resume_state is not None:
            model_config = ModelConfig.from_dict(resume_state["model_config"])
    else:
        manifest, model_config, seq_len, resume_state, init = setup_alignment(cfg, overrides, rank == 0)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = GEB(model_config).to(device)
    if init is not None and resume_state is None:
        model.load_state_dict(init.state_dict())
    parallelize(model, device, fsdp=cfg.fsdp and world_size > 1, ac=cfg.ac, compile=cfg.compile)
    loader = make_loader(cfg, seq_len, rank, world_size, model_config.vocab_size)
    optimizer = build_optimizer(model, cfg, world_size)
    run = Run(cfg, model=model, raw_model=model, optimizer=optimizer, loader=loader, seq_len=seq_len, device=device,
              rank=rank, world_size=world_size, embedding_shrink=EmbeddingGradShrink(model),
              tokenizer_sha=manifest["tokenizer_sha256"],
              reference=init.to(device).eval().requires_grad_(False) if cfg.stage == "dpo" else None)
    if resume_state is not None:
        restore(run, resume_state)
    run.model = wrap_model(model, cfg, world_size, local_rank, device)
    open_logs(run)
    signal.signal(signal.SIGTERM, partial(request_stop, run))
    signal.signal(signal.SIGINT, partial(request_stop, run))

    start = run.state.step
    last_stop = cfg.max_steps if not cfg.run_steps else min(cfg.max_steps, start + cfg.run_steps)
    if run.master and start >= last_stop:
        print(f"{cfg.out} is already at step {start} of --max-steps {cfg.max_steps}: nothing to train; raise "
              "--max-steps to continue or pass a new --out", flush=True)
    stopped = train_loop(run, last_stop)
    if run.state.step > start:
        save(run)  # before the final evaluation: an evaluation that fails must not cost the run its last checkpoint
        if stopped and run.master:
            print(f"stopped by signal at step {run.state.step}; checkpoint saved, resume with the same command",
                  flush=True)
        if run.state.step % cfg.eval_every == 0 or run.state.step == cfg.max_steps:
            evaluate(run)
    if run.state.step == cfg.max_steps and cfg.eval_tasks and run.master:
        evaluate_tasks(run)
    finish(run)


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, DataError) as e:
        fail(str(e))
    # DDP, ZeRO and FSDP keep the (destroyed) process group's C++ object alive from reference cycles; collect them
    # here, not during interpreter shutdown, so Gloo's threads are torn down while the runtime is still whole.
    gc.collect()
