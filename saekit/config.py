"""Typed schemas for every saekit setting.

Hydra composes `conf/` and checks it against these dataclasses (unknown keys are errors); the CLI then
turns the result into plain dataclass objects, so nothing below `cli.py` sees a DictConfig and a notebook
can build the same objects by hand. Range checks live in `__post_init__` and raise `ConfigError` with a
message naming the field. Counts carry their unit in the name (tokens, steps).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from saekit.errors import check_choice, require

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16")
NORMALIZATIONS = ("none", "scale", "layer_norm")
DEAD_REMEDIES = ("auxk", "resample", "none")
PRECISIONS = ("fp32", "tf32", "bf16")
CACHE_VERIFY = ("size", "full")
CACHE_MODES = ("disk", "stream")
SHUFFLES = ("auto", "global", "block")
LOGGERS = ("none", "wandb", "tensorboard")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class ModelConfig:
    """The language model whose activations the SAE reads."""

    name: str = MISSING
    """Hub name (`gpt2`, `EleutherAI/pythia-70m`) or a local HuggingFace model folder."""
    display_name: Optional[str] = None
    """Short name used in results tables; defaults to the last path component of `name`."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit); ignored for local folders."""
    dtype: str = "float32"
    """Dtype the model runs in while caching activations."""

    def __post_init__(self) -> None:
        check_choice("model.dtype", self.dtype, DTYPES)

    @property
    def short_name(self) -> str:
        return self.display_name or self.name.rstrip("/").split("/")[-1]


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes token windows."""

    name: str = "text"
    """Short name used in results tables."""
    source: str = "text_files"
    """`text_files` (local .txt / .json files) or `hf` (a HuggingFace dataset, streaming allowed)."""
    paths: list[str] = field(default_factory=list)
    """text_files: training files. A .txt is split into documents at `doc_separator`; a .json holds a list of strings."""
    eval_paths: list[str] = field(default_factory=list)
    """text_files: held-out files. Empty: the last `eval_fraction` of the training documents are held out."""
    eval_fraction: float = 0.1
    """Fraction of documents held out when no separate eval files or split are given."""
    hf_path: Optional[str] = None
    """hf: dataset name on the Hub (or a builder such as `text` with `hf_data_files`)."""
    hf_config: Optional[str] = None
    """hf: dataset configuration name."""
    hf_data_files: Optional[list[str]] = None
    """hf: data files handed to `datasets.load_dataset`."""
    split: str = "train"
    """hf: split to train on."""
    eval_split: Optional[str] = None
    """hf: held-out split; None holds out the last `eval_fraction` of the documents read."""
    text_column: str = "text"
    """hf: column holding the text."""
    streaming: bool = False
    """hf: stream the dataset instead of downloading it whole."""
    doc_separator: str = "\n\n"
    """text_files: string that separates documents inside a .txt file."""
    ctx_len: int = 128
    """Tokens per window (including the BOS token when `prepend_bos`)."""
    prepend_bos: bool = True
    """Start every window with the BOS token, as the model saw in training."""
    exclude_bos: bool = True
    """Drop the BOS position's activation from the cache (its norm is an outlier at most hooks)."""
    n_train_tokens: Optional[int] = None
    """Tokens to cache for training; None: all the training text holds (capped at `n_tokens` for streaming)."""
    n_eval_tokens: int = 65536
    """Held-out tokens to cache for evaluation."""
    normalize: str = "scale"
    """Input normalization: `none`, `scale` (E||x|| = sqrt(d), scale saved in the checkpoint) or `layer_norm`."""

    def __post_init__(self) -> None:
        check_choice("data.source", self.source, ("text_files", "hf"))
        check_choice("data.normalize", self.normalize, NORMALIZATIONS)
        require(self.ctx_len >= 2, f"data.ctx_len={self.ctx_len} must be at least 2")
        require(0 < self.eval_fraction < 1, f"data.eval_fraction={self.eval_fraction} must be in (0, 1)")
        require(self.n_eval_tokens > 0, f"data.n_eval_tokens={self.n_eval_tokens} must be positive")
        require(
            self.n_train_tokens is None or self.n_train_tokens > 0,
            f"data.n_train_tokens={self.n_train_tokens} must be positive (or null for all)",
        )
        if self.source == "text_files":
            require(bool(self.paths), "data.paths is empty; give text files, e.g. data.paths=[/path/a.txt]")
        else:
            require(bool(self.hf_path), "data.hf_path is empty; name a HuggingFace dataset, e.g. data.hf_path=roneneldan/TinyStories")


@dataclass
class DeadConfig:
    """How dead latents are counted and revived."""

    method: str = "auxk"
    """`auxk` (auxiliary TopK loss on dead latents), `resample` (re-initialize them at chosen steps) or `none`."""
    window_tokens: int = 10_000_000
    """A latent is dead after this many training tokens without firing (capped at n_tokens/10 for short runs)."""
    k_aux: Optional[int] = None
    """AuxK: dead latents used to model the residual; None means d/2 (Gao et al. 2024, A.2)."""
    aux_alpha: float = 1 / 32
    """AuxK: weight of the auxiliary loss."""
    resample_steps: Optional[list[int]] = None
    """resample: steps after which dead latents are re-initialized; None: after 20%, 40% and 60% of the run."""
    resample_encoder_frac: float = 0.2
    """resample: new encoder rows get this fraction of the mean alive encoder-row norm (Bricken et al. 2023)."""
    resample_n_tokens: int = 65536
    """resample: training activations scored to find high-loss inputs."""

    def __post_init__(self) -> None:
        check_choice("dead.method", self.method, DEAD_REMEDIES)
        require(self.window_tokens > 0, f"dead.window_tokens={self.window_tokens} must be positive")
        require(self.k_aux is None or self.k_aux > 0, f"dead.k_aux={self.k_aux} must be positive (or null for d/2)")
        require(self.aux_alpha >= 0, f"dead.aux_alpha={self.aux_alpha} must be >= 0")
        require(self.resample_encoder_frac > 0, f"dead.resample_encoder_frac={self.resample_encoder_frac} must be positive")
        require(self.resample_n_tokens > 0, f"dead.resample_n_tokens={self.resample_n_tokens} must be positive")
        require(all(step > 0 for step in self.resample_steps or []),
                f"dead.resample_steps={self.resample_steps} must hold positive step numbers")


@dataclass
class OptimizerConfig:
    """Adam with linear warmup, a constant phase and a linear decay to zero."""

    name: str = "adam"
    lr: Optional[float] = None
    """Learning rate; None: 2e-4 / sqrt(n / 2**14) * sqrt(768 / d) (Gao et al. 2024 A.3, width-adjusted; see train.py)."""
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 6.25e-10
    warmup_steps: int = 100
    """Linear warmup steps (at most 5% of the run)."""
    decay_frac: float = 0.2
    """Fraction of the run at the end over which the rate decays linearly to zero."""
    grad_clip: Optional[float] = None
    """Clip the global gradient norm to this value; None: no clipping."""

    def __post_init__(self) -> None:
        check_choice("optimizer.name", self.name, ("adam",))
        require(self.lr is None or self.lr > 0, f"optimizer.lr={self.lr} must be positive (or null for auto)")
        require(0 <= self.decay_frac <= 1, f"optimizer.decay_frac={self.decay_frac} must be in [0, 1]")
        require(self.warmup_steps >= 0, f"optimizer.warmup_steps={self.warmup_steps} must be >= 0")
        require(self.grad_clip is None or self.grad_clip > 0, f"optimizer.grad_clip={self.grad_clip} must be positive")


@dataclass
class InitConfig:
    """Initialization switches (SPEC section 3)."""

    b_pre: str = "geometric_median"
    """`geometric_median` of a sample of training activations, or `zero`."""
    tied: bool = True
    """Encoder = decoder transpose at init (not tied afterwards)."""
    scale_encoder: bool = True
    """Scale the encoder so reconstructions match input norms on a sample (every activation)."""
    decoder_norm: bool = True
    """Keep decoder directions unit-norm (renormalize after every optimizer step)."""
    grad_projection: bool = True
    """Remove each decoder row's gradient component along the row before the step."""
    n_sample_tokens: int = 16384
    """Training activations sampled for the geometric median and the encoder scale."""

    def __post_init__(self) -> None:
        check_choice("init.b_pre", self.b_pre, ("geometric_median", "zero"))
        require(self.n_sample_tokens > 0, f"init.n_sample_tokens={self.n_sample_tokens} must be positive")


# The held-out metrics `train` reports (its `objective` names one or several): always, with final_eval.downstream,
# and with final_eval.refine_tokens.
OBJECTIVE_METRICS = ("nmse", "mse", "explained_variance", "l0", "dead_frac", "dead_frac_train", "cossim", "l2_ratio",
                     "relative_reconstruction_bias", "l1", "frac_alive")
DOWNSTREAM_METRICS = ("delta_ce", "loss_recovered", "kl", "ce_clean", "ce_spliced", "kl_div_score", "ce_loss_score")
REFINE_METRICS = ("refine_ratio", "refine_mse_gain")


@dataclass
class FinalEvalConfig:
    """What `saekit train` evaluates after training, beyond the reconstruction metrics (`saekit eval` does all)."""

    downstream: bool = False
    """Splice into the model: delta_ce, loss_recovered, kl, ... (loads the model)."""
    downstream_tokens: int = 8192
    k_primes: list[int] = field(default_factory=list)
    """Progressive codes: test-time TopK(k') rows."""
    thetas: list[float] = field(default_factory=list)
    """Progressive codes: test-time JumpReLU(theta) rows."""
    refine_tokens: int = 0
    """Shrinkage by refinement on this many held-out tokens; 0: off."""


@dataclass
class CacheConfig:
    """The on-disk activation cache."""

    dir: str = "outputs/activations"
    """Root folder of all caches; each cache is a sub-folder named by its content key."""
    dtype: str = "float32"
    """Storage dtype of cached activations."""
    shard_mb: int = 256
    """Target size of one shard file."""
    verify: str = "size"
    """On open: `size` checks the manifest and every file's size (cheap); `full` re-hashes every file (sha256)."""
    batch_windows: int = 64
    """Token windows per model forward pass while building."""
    mode: str = "disk"
    """`disk`: activations cached on disk once and reused; `stream`: produced on the fly while the SAE trains."""

    def __post_init__(self) -> None:
        # true/false were the old spelling of full/size.
        self.verify = {"True": "full", "true": "full", "False": "size", "false": "size"}.get(str(self.verify), self.verify)
        check_choice("cache.verify", self.verify, CACHE_VERIFY)
        check_choice("cache.mode", self.mode, CACHE_MODES)
        check_choice("cache.dtype", self.dtype, DTYPES)
        require(self.shard_mb > 0, f"cache.shard_mb={self.shard_mb} must be positive")
        require(self.batch_windows > 0, f"cache.batch_windows={self.batch_windows} must be positive")


@dataclass
class LoaderConfig:
    """How training batches are drawn from the cache (or from the stream's buffer)."""

    shuffle: str = "auto"
    """`global`: each batch gathers random rows (fast while the cache sits in RAM); `block`: contiguous blocks
    read in a shuffled order, rows shuffled inside a RAM buffer (caches bigger than RAM); `auto` picks."""
    buffer_tokens: Optional[int] = None
    """Rows held in the shuffling buffer (block shuffle, streaming); None: sized from free memory."""
    block_kib: int = 1024
    """Size of one contiguous block read from a shard (block shuffle)."""

    def __post_init__(self) -> None:
        check_choice("loader.shuffle", self.shuffle, SHUFFLES)
        require(self.buffer_tokens is None or self.buffer_tokens > 0,
                f"loader.buffer_tokens={self.buffer_tokens} must be positive (or null to size it from free memory)")
        require(self.block_kib >= 1024, f"loader.block_kib={self.block_kib} must be at least 1024 (1 MiB blocks)")


@dataclass
class LoggerConfig:
    """Experiment tracking (`logger=none|wandb|tensorboard`): the step log, the final metrics table and the run
    config go to the tracker, one tracker run per training job, named after its run id."""

    name: str = "none"
    """`none`, `wandb` (pip install "saekit[wandb]") or `tensorboard` (pip install "saekit[tensorboard]")."""
    project: str = "saekit"
    """wandb: the project the runs go to."""
    entity: Optional[str] = None
    """wandb: the team or user; None: the account's default."""
    group: Optional[str] = None
    """wandb: a group gathering runs (e.g. one sweep's jobs); None: no group."""
    tags: list[str] = field(default_factory=list)
    """wandb: tags of every run."""
    mode: str = "offline"
    """wandb: `offline` (the default: works without an account or a network; upload later with `wandb sync`),
    `online` or `disabled`."""
    dir: Optional[str] = None
    """Where tracker files go; None: inside the run folder (<run>/tensorboard, <run>/wandb). A shared folder holds
    one sub-folder per run (TensorBoard: <dir>/<run id>), so one `tensorboard --logdir <dir>` compares a sweep."""

    def __post_init__(self) -> None:
        check_choice("logger", self.name, LOGGERS)
        check_choice("logger.mode", self.mode, WANDB_MODES)
        require(bool(self.project), "logger.project is empty; name a project, e.g. logger.project=saekit")


def _as_list(value: Any) -> Optional[list]:
    return list(value) if isinstance(value, (list, tuple)) else None


_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")


def hook_layer(hook: str) -> Optional[int]:
    """Layer index of a `blocks.{L}.…` hook name, None for hooks outside the blocks."""
    match = _BLOCK_HOOK.match(hook)
    return int(match.group(1)) if match else None


@dataclass
class SiteConfig:
    """Shared by every command that reads activations: model, hook point, data, cache, device."""

    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    cache: CacheConfig = field(default_factory=CacheConfig)
    layer: Any = 2
    """Block whose residual stream is read (`blocks.{layer}.hook_resid_post`); a list (`layer=[0,1,2]`) reads
    several hooks from one model pass."""
    hook: Any = None
    """Any transformer-lens hook name, or a list of them; overrides `layer` when set."""
    hook_out: Optional[str] = None
    """Transcoders: the hook whose activation y is predicted from the activation x at `hook` (e.g. an MLP's output
    from its input); the cache then holds (x, y) pairs. None: an SAE, which reconstructs x."""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu` or `cuda`."""
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("device", self.device, DEVICES)
        layers = _as_list(self.layer)
        if layers is not None:
            self.layer = layers
        for layer in layers if layers is not None else [self.layer]:
            require(isinstance(layer, int) and not isinstance(layer, bool),
                    f"layer={self.layer} must be an integer or a list of integers, e.g. layer=2 or layer=[0,1,2]")
            require(layer >= 0, f"layer={self.layer} must be >= 0")
        require(layers is None or len(layers) > 0, "layer=[] is empty; give at least one layer, e.g. layer=[0,1]")
        hooks = _as_list(self.hook)
        if hooks is not None:
            self.hook = hooks
            require(len(hooks) > 0, "hook=[] is empty; give at least one hook name")
        for hook in hooks if hooks is not None else ([] if self.hook is None else [self.hook]):
            require(isinstance(hook, str) and bool(hook),
                    f"hook={self.hook} must be a hook name or a list of them (`saekit hooks` lists them)")
        names = self.hook_names
        require(len(set(names)) == len(names), f"hook/layer list {names} names a hook twice; list each once")
        if self.hook_out is not None:
            self._check_hook_out()

    def _check_hook_out(self) -> None:
        """A transcoder reads one hook and predicts another."""
        require(isinstance(self.hook_out, str) and bool(self.hook_out),
                f"hook_out={self.hook_out} must be one hook name (`saekit hooks` lists them), or null for an SAE")
        require(not self.multi_hook, f"hook_out={self.hook_out} with the list {self.hook_names}: a transcoder reads "
                                     f"one hook; give a single hook= (or layer=) with hook_out")
        require(self.hook_out != self.hook_names[0],
                f"hook_out={self.hook_out} is the hook the transcoder reads (hook={self.hook_names[0]}); name another "
                f"hook, e.g. hook=blocks.2.ln2.hook_out hook_out=blocks.2.hook_mlp_out, or drop hook_out for an SAE")

    @property
    def hook_names(self) -> list[str]:
        """Every hook this config reads: `hook` (one or a list), else `blocks.{layer}.hook_resid_post` per layer."""
        if self.hook is not None:
            return list(self.hook) if isinstance(self.hook, list) else [self.hook]
        layers = self.layer if isinstance(self.layer, list) else [self.layer]
        return [f"blocks.{layer}.hook_resid_post" for layer in layers]

    @property
    def multi_hook(self) -> bool:
        return len(self.hook_names) > 1 or isinstance(self.hook, list) or isinstance(self.layer, list)

    @property
    def hook_name(self) -> str:
        """The one hook of a single-hook config (a list config is split per hook first; see `per_hook`)."""
        names = self.hook_names
        if len(names) != 1:
            raise ValueError(f"{names} holds several hooks; split the config with per_hook() first")
        return names[0]

    def per_hook(self) -> list["SiteConfig"]:
        """One single-hook copy of this config per hook it reads (same class, same settings)."""
        from dataclasses import replace

        if self.hook is None:  # the same config `layer=L` alone would give
            layers = self.layer if isinstance(self.layer, list) else [self.layer]
            return [replace(self, layer=layer) for layer in layers]
        return [replace(self, hook=name, layer=hook_layer(name) if hook_layer(name) is not None else 0)
                for name in self.hook_names]

    @property
    def hook_layer(self) -> Optional[int]:
        return hook_layer(self.hook_name)


@dataclass
class TrainConfig(SiteConfig):
    """`saekit train`: one SAE on one hook."""

    activation: Any = MISSING
    """The SAE variant's settings: its own config dataclass (saekit/sae/<variant>.py), chosen by `activation=<name>`."""
    dead: DeadConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    init: InitConfig = field(default_factory=InitConfig)
    final_eval: FinalEvalConfig = field(default_factory=FinalEvalConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Experiment tracking (conf/logger/): none, wandb or tensorboard."""
    n: int = 512
    """Number of latents (dictionary size)."""
    k: int = 32
    """Active latents per token (TopK family)."""
    lam: float = 1.0
    """Sparsity coefficient lambda (ReLU family)."""
    n_tokens: int = 1_000_000
    """Training tokens (the cache is looped over in epochs if it holds fewer)."""
    batch_size: int = 4096
    """Tokens per optimizer step."""
    log_every_steps: int = 10
    ckpt_every_steps: int = 100
    eval_every_steps: Optional[int] = None
    """Evaluate on held-out tokens every this many steps (eval_nmse in steps.csv); None: only at the end."""
    eval_delta_ce: bool = False
    """With eval_every_steps: also splice into the model for eval_delta_ce (loads the model; slower)."""
    eval_tokens: int = 8192
    """With eval_delta_ce: held-out tokens for the downstream pass."""
    resume: bool = True
    """Continue from the run folder's last checkpoint when the config matches."""
    lock_wait_s: float = 0.0
    """Seconds to wait for another process using the same run folder to finish; 0 refuses at once."""
    run_id: Optional[str] = None
    """Name of the run in results tables; defaults to the run folder's name."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Filled by the CLI with the command-line overrides that made the run (results table columns)."""
    fast_path: bool = True
    """TopK family: train through the sparse kernels (sae/sparse.py); false runs the dense reference (same math)."""
    precision: str = "fp32"
    """Encoder/decoder matmul precision on CUDA: fp32, tf32 (TF32 tensor cores) or bf16 (autocast; fp32 weights)."""
    compile: bool = False
    """torch.compile the loss computation (CUDA mainly; the first steps pay for compiling)."""
    prefetch: int = 2
    """Batches gathered ahead of the training step in a background thread (pinned memory on CUDA); 0 turns it off."""
    skip: bool = False
    """Transcoders (hook_out set): add a linear skip path, ŷ = W_dec z + b_out + W_skip x (W_skip zero at init)."""
    shard_latents: int = 1
    """Latent sharding (torchrun): split the SAE's latents over this many ranks (1 = none); the world size must be
    a multiple of it, the rest of the ranks forming data-parallel groups. TopK only."""
    dist_timeout_s: float = 300.0
    """Data-parallel training (torchrun): how long a rank waits for the others in a collective before the job
    ends with one line (a killed rank must not hang the rest)."""
    objective: Any = "nmse"
    """What `train` returns to Hydra sweeper plugins (Optuna, Nevergrad, Ax): a held-out metric's name, or a list of
    names for a multi-objective search (`objective=[nmse,l0]`); with several hooks, the mean over them."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_objective()
        require(self.dist_timeout_s > 0, f"dist_timeout_s={self.dist_timeout_s} must be positive (seconds)")
        require(self.shard_latents >= 1, f"shard_latents={self.shard_latents} must be >= 1 (1: no sharding)")
        from saekit.sae.registry import as_variant_config

        self.activation = as_variant_config(self.activation)
        check_choice("precision", self.precision, PRECISIONS)
        require(self.prefetch >= 0, f"prefetch={self.prefetch} must be >= 0 (0 turns prefetching off)")
        self._check_transcoder()
        require(self.n > 0, f"n={self.n} must be positive")
        require(0 < self.k <= self.n, f"k={self.k} must be in 1..n (n={self.n}); lower k or raise n")
        self.activation.check_run(self.n, self.k)
        require(self.lam >= 0, f"lam={self.lam} must be >= 0")
        require(self.n_tokens > 0, f"n_tokens={self.n_tokens} must be positive")
        require(self.batch_size > 0, f"batch_size={self.batch_size} must be positive")
        require(
            self.n_tokens >= self.batch_size,
            f"n_tokens={self.n_tokens} is smaller than one batch (batch_size={self.batch_size}); raise n_tokens",
        )
        require(self.log_every_steps > 0, f"log_every_steps={self.log_every_steps} must be positive")
        require(self.eval_every_steps is None or self.eval_every_steps > 0,
                f"eval_every_steps={self.eval_every_steps} must be positive (or null for no evaluation during training)")
        require(self.eval_tokens > 0, f"eval_tokens={self.eval_tokens} must be positive")
        require(self.ckpt_every_steps > 0, f"ckpt_every_steps={self.ckpt_every_steps} must be positive")
        require(self.lock_wait_s >= 0, f"lock_wait_s={self.lock_wait_s} must be >= 0 (0 refuses a busy run folder at once)")
        resample_steps = self.dead.resample_steps if isinstance(self.dead, DeadConfig) else None
        late = [step for step in resample_steps or [] if step >= self.n_steps]
        require(not late, f"dead.resample_steps={self.dead.resample_steps} has steps at or past the run's end "
                          f"(n_steps={self.n_steps}); use earlier steps")

    def _check_objective(self) -> None:
        names = [self.objective] if isinstance(self.objective, str) else list(self.objective or [])
        reported = OBJECTIVE_METRICS + (DOWNSTREAM_METRICS if self.final_eval.downstream else ()) + \
            (REFINE_METRICS if self.final_eval.refine_tokens else ())
        require(bool(names), "objective=[] names no metric; use objective=nmse (or a list such as [nmse,l0])")
        for name in names:
            require(name in reported, f"objective={name} is not a metric train reports; use one of: {', '.join(reported)}"
                    f"{'' if self.final_eval.downstream else ' (final_eval.downstream=true adds delta_ce, kl, ...)'}")
        self.objective = names[0] if isinstance(self.objective, str) else names

    def _check_transcoder(self) -> None:
        """Settings a transcoder (hook_out set) does not support yet, refused before anything runs."""
        require(not self.skip or self.hook_out is not None,
                "skip=true adds a skip path to a transcoder, but hook_out is not set; set hook_out=<hook> (e.g. "
                "hook=blocks.2.ln2.hook_out hook_out=blocks.2.hook_mlp_out) or drop skip")
        if self.hook_out is None:
            return
        # getattr: a config built by hand may leave a group unset (MISSING); only set ones are checked.
        require(getattr(self.cache, "mode", None) != "stream",
                f"cache.mode=stream does not support transcoders (hook_out={self.hook_out}); use cache.mode=disk")
        require(getattr(self.data, "normalize", None) != "layer_norm",
                f"data.normalize=layer_norm cannot be undone on a transcoder's output (hook_out={self.hook_out}); use "
                f"data.normalize=scale or none")
        require(getattr(self.dead, "method", None) != "resample",
                f"dead=resample is not supported for transcoders (hook_out={self.hook_out}); use dead=auxk or "
                f"dead=none")

    @property
    def n_steps(self) -> int:
        return self.n_tokens // self.batch_size


@dataclass
class CacheCommandConfig(SiteConfig):
    """`saekit cache`: build or reuse the activation cache for a model, hook and dataset."""

    n_tokens: int = 1_000_000
    """Used only to cap the cached training tokens of streaming datasets."""


@dataclass
class ForeignSite:
    """Settings of the commands that read any SAE file (eval, inspect, export, import): the text, and where another
    project's SAE file (SAELens, sparsify, Gemma Scope, OpenAI) reads when the file does not say. A saekit
    checkpoint records its model and hooks, and refuses model=/hook=/hook_out=."""

    data: Optional[DataConfig] = None
    """The text; None: a saekit checkpoint's training data (its held-out split), or the data a foreign file names."""
    model: Optional[ModelConfig] = None
    """Foreign SAE files only: the model (model=<option>), when the file does not name it."""
    hook: Optional[str] = None
    """Foreign SAE files only: the hook the SAE reads, when the file does not name it."""
    hook_out: Optional[str] = None
    """Foreign transcoder files only: the hook it predicts, when the file does not name it."""


@dataclass
class EvalConfig(ForeignSite):
    """`saekit eval`: every SPEC 4 metric of a trained SAE (or of every run in a sweep folder) on held-out tokens."""

    ckpt: str = MISSING
    """A run folder, a checkpoint file (`sae.safetensors`) or a sweep folder (every run below it); or another
    project's SAE: a SAELens folder, a sparsify folder, a Gemma Scope params.npz, an OpenAI GPT-2 SAE .pt."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    device: str = "auto"
    batch_size: int = 8192
    """Tokens per batch for the reconstruction metrics."""
    downstream: bool = True
    """Splice reconstructions into the model: ce_clean, ce_spliced, ce_zero, ce_mean, delta_ce, loss_recovered, kl."""
    downstream_tokens: int = 32768
    """Token budget of the downstream metrics (whole held-out windows, taken in order)."""
    downstream_batch_windows: int = 16
    """Windows per forward pass (each runs as 4 variants: clean, spliced, zero, mean)."""
    score_bos: bool = False
    """Score the prediction made at the first (BOS) position too."""
    ablation_positions: int = 32
    """Ablation sparsity: sampled token positions (every active latent there is ablated); 0 turns it off."""
    ablation_horizon: int = 16
    """Ablation sparsity: T, the ablated position and the T − 1 after it."""
    k_primes: list[int] = field(default_factory=list)
    """Progressive codes: test-time TopK(k') values, one row each (with a k_prime column)."""
    thetas: list[float] = field(default_factory=list)
    """Progressive codes: test-time JumpReLU(theta) values, one row each (with a theta column)."""
    progressive_delta_ce: bool = False
    """Progressive codes: also delta_ce (one downstream pass per value)."""
    prefixes: list[int] = field(default_factory=list)
    """Per-prefix rows: nmse and l0 decoding with only the first m latents, one row per m (a `prefix` column).
    Empty: a Matryoshka SAE's own group boundaries, none for other SAEs."""
    refine_tokens: int = 4096
    """Shrinkage by refinement on this many held-out tokens; 0 turns it off."""
    decoder_similarity: bool = True
    """max_pairwise_decoder_cosine_sim and average_max_decoder_cosine_sim (n² · d work, in row chunks)."""
    refine_steps: int = 300
    """Projected-gradient steps of the refinement."""
    seed: int = 0
    lock_wait_s: float = 0.0
    """Seconds to wait for another process using the same run folder to finish; 0 refuses at once."""

    def __post_init__(self) -> None:
        check_choice("device", self.device, DEVICES)
        require(self.batch_size > 0, f"batch_size={self.batch_size} must be positive")
        require(self.downstream_tokens > 0, f"downstream_tokens={self.downstream_tokens} must be positive")
        require(self.downstream_batch_windows > 0, f"downstream_batch_windows={self.downstream_batch_windows} must be positive")
        require(self.ablation_positions >= 0, f"ablation_positions={self.ablation_positions} must be >= 0")
        require(self.ablation_horizon >= 1, f"ablation_horizon={self.ablation_horizon} must be >= 1")
        require(all(k > 0 for k in self.k_primes), f"k_primes={self.k_primes} must be positive integers")
        require(all(t >= 0 for t in self.thetas), f"thetas={self.thetas} must be >= 0")
        require(self.refine_tokens >= 0, f"refine_tokens={self.refine_tokens} must be >= 0")
        require(self.refine_steps > 0, f"refine_steps={self.refine_steps} must be positive")
        require(self.lock_wait_s >= 0, f"lock_wait_s={self.lock_wait_s} must be >= 0 (0 refuses a busy run folder at once)")


EXPORT_FORMATS = ("saelens", "sparsify")


@dataclass
class ExportConfig(ForeignSite):
    """`saekit export ckpt=<run> format=saelens|sparsify out=<folder>`: the SAE in another project's layout."""

    ckpt: str = MISSING
    """A run folder or `sae.safetensors` (or any file `saekit eval` reads, to convert it)."""
    format: str = "saelens"
    """`saelens` (cfg.json + sae_weights.safetensors + sparsity.safetensors) or `sparsify` (<hookpoint>/cfg.json +
    sae.safetensors)."""
    out: str = MISSING
    """The folder to write (refused when it exists and is not empty, unless overwrite=true)."""
    overwrite: bool = False
    sparsity: bool = True
    """saelens: write sparsity.safetensors, the held-out firing rates (reads the run's held-out activations)."""
    hookpoint: Optional[str] = None
    """sparsify: the hook folder's name; None derives it (`layers.3`, or `h.3` for GPT-2) from the hook."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    device: str = "auto"
    batch_size: int = 8192
    """Tokens per batch when measuring the held-out firing rates."""

    def __post_init__(self) -> None:
        check_choice("format", self.format, EXPORT_FORMATS)
        check_choice("device", self.device, DEVICES)
        require(self.batch_size > 0, f"batch_size={self.batch_size} must be positive")
        require(self.hookpoint is None or (self.hookpoint.strip() and "/" not in self.hookpoint),
                f"hookpoint={self.hookpoint!r} must be a module name such as layers.3 (no /)")


@dataclass
class ImportConfig(ForeignSite):
    """`saekit import <file or folder> out=<folder>`: another project's SAE as a saekit checkpoint."""

    src: str = MISSING
    """A SAELens folder, a sparsify folder (one hook, or a run folder with one per hook), a Gemma Scope params.npz
    or an OpenAI GPT-2 SAE .pt."""
    out: str = MISSING
    """The folder to write `sae.safetensors` into (one subfolder per hook for a sparsify run folder)."""
    overwrite: bool = False


def register_schemas() -> None:
    """Register the schemas in Hydra's ConfigStore so `conf/` is validated against them (the variants' own under
    `schema/activation/<name>`)."""
    from hydra.core.config_store import ConfigStore

    from saekit.sae import registry

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    registry.register_schemas()
    cs.store(name="cache_schema", node=CacheCommandConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="import_schema", node=ImportConfig)
    from saekit.inspect.config import InspectConfig  # beside its command's code; it imports this module

    cs.store(name="inspect_schema", node=InspectConfig)
