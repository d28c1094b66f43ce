"""The megatron engine: how gradients are reduced and the optimizer steps.

megatron DDP (contiguous grad buffers, optional overlapped reduce) + the DistributedOptimizer (ZeRO-1
style sharded optimizer state) + warmup/cosine OptimizerParamScheduler, driven by megatron's pipeline
schedules (which also do gradient accumulation). With one process it is the same code on a world of one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from mtp_pretrain import compat
from mtp_pretrain.config import OptimConfig
from mtp_pretrain.engine.base import Batch, EngineBase, StepResult, reduce_outputs, step_normalization, take
from mtp_pretrain.model.mtp_model import sync_embedding_copy_grads
from mtp_pretrain.targets import HeadStats


def _finalize_model_grads(model: list[torch.nn.Module], *args: Any, **kwargs: Any) -> None:
    """megatron's gradient finalization (DP reduction, tied embeddings) + the sequential heads' embedding copy."""
    finalize_model_grads(model, *args, **kwargs)
    sync_embedding_copy_grads(model)


class MegatronEngine(EngineBase):
    """Wraps one model chunk; `train_step` runs forward/backward over micro-batches and steps."""

    def __init__(
        self,
        model: torch.nn.Module | list[torch.nn.Module],
        config: TransformerConfig,
        optim: OptimConfig,
        total_steps: int,
        bf16: bool = False,
        overlap_grad_reduce: bool = False,
        bucket_size: int | None = None,
    ) -> None:
        chunks = model if isinstance(model, list) else [model]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=overlap_grad_reduce,
            use_distributed_optimizer=True,
            bucket_size=bucket_size,  # elements per reduction bucket; None = megatron's default
        )
        # one DDP per model chunk; as in megatron's training loop, only the first chunk buckets its grads
        self.chunks = [
            DistributedDataParallel(config=config, ddp_config=ddp_config, module=m, disable_bucketing=i > 0)
            for i, m in enumerate(chunks)
        ]
        self.config = config
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=optim.lr,
                min_lr=optim.min_lr,
                weight_decay=optim.weight_decay,
                adam_beta1=optim.beta1,
                adam_beta2=optim.beta2,
                adam_eps=optim.eps,
                clip_grad=optim.clip_grad,
                bf16=bf16,
                params_dtype=config.params_dtype,
                use_distributed_optimizer=True,
            ),
            self.chunks,
        )
        self.scheduler = self._schedule(self.optimizer, optim, total_steps)
        # What megatron's own training loop wires into the config for its schedules.
        config.finalize_model_grads_func = _finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        if overlap_grad_reduce:
            no_sync = [c.no_sync for c in self.chunks]
            grad_sync = [c.start_grad_sync for c in self.chunks]
            config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
            config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync

    @property
    def module(self) -> torch.nn.Module:
        return self.chunks[0].module

    @property
    def models(self) -> list[torch.nn.Module]:
        return [c.module for c in self.chunks]

    def save(self, directory: Path) -> None:
        from megatron.core import dist_checkpointing

        dist_checkpointing.save(self.sharded_state_dict(), str(directory))

    def load(self, directory: Path) -> None:
        from megatron.core import dist_checkpointing

        self.load_sharded_state_dict(
            dist_checkpointing.load(self.sharded_state_dict(is_loading=True), str(directory))
        )

    @property
    def model(self) -> DistributedDataParallel:
        """The (first) model chunk; with one chunk per rank, the model."""
        return self.chunks[0]

    def _forward_step(self, data_iterator: Iterator[Batch], model: torch.nn.Module) -> tuple[Any, Callable]:
        batch = next(data_iterator)
        dev = compat.device()  # loaders yield CPU tensors; on GPUs the model's weights live on the device
        output = model(*(t.to(dev, non_blocking=True) for t in batch))

        def loss_func(out: tuple[Tensor, HeadStats]) -> tuple[Tensor, dict]:
            loss, stats = out
            # the schedule divides the returned loss in place: report a detached copy
            return loss, {"loss": loss.detach().clone(), "stats": stats}

        return output, loss_func

    def _run(
        self,
        batches: Iterator[Batch],
        num_microbatches: int,
        seq_len: int,
        micro_batch: int,
        forward_only: bool,
    ):
        mbs = take(batches, num_microbatches)
        # interleaved: every chunk walks the same micro-batches
        data = [iter(mbs) for _ in self.chunks] if len(self.chunks) > 1 else iter(mbs)
        # the schedule divides each micro-batch's loss by num_microbatches and DDP averages over DP ranks:
        # mtp.loss_normalization=global cancels both (targets.StepCounts)
        with step_normalization(self.models, mbs, seq_len):
            return get_forward_backward_func()(
                forward_step_func=self._forward_step,
                data_iterator=data,
                model=self.chunks,
                num_microbatches=num_microbatches,
                seq_length=seq_len,
                micro_batch_size=micro_batch,
                forward_only=forward_only,
            )

    def train_step(
        self,
        batches: Iterator[Batch],
        num_microbatches: int,
        seq_len: int,
        micro_batch: int,
        stop_requested: Callable[[], bool] = lambda: False,
    ) -> StepResult:
        for c in self.chunks:
            c.train()
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run(batches, num_microbatches, seq_len, micro_batch, forward_only=False)
        loss, stats = reduce_outputs(outputs)
        nonfinite, stop = self._agree(outputs, stop_requested)
        if nonfinite:
            # never apply an update computed from NaN/inf; the scheduler does not advance (as megatron's
            # skipped iterations); the gradients are cleared by the next step's zero_grad
            return StepResult(loss, stats, float("nan"), self.lr, skipped=True, nonfinite=True, stop=stop)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        return StepResult(loss, stats, float(grad_norm or 0.0), self.lr, skipped=not ok, stop=stop)

    @torch.no_grad()
    def eval_step(
        self, batches: Iterator[Batch], num_microbatches: int, seq_len: int, micro_batch: int
    ) -> tuple[float, HeadStats | None]:
        for c in self.chunks:
            c.eval()
        return reduce_outputs(self._run(batches, num_microbatches, seq_len, micro_batch, forward_only=True))

    # -- checkpoint protocol ------------------------------------------------------------------------
    def sharded_state_dict(self, is_loading: bool = False) -> dict:
        """Model + optimizer as megatron ShardedTensors (a template to fill when is_loading).

        Chunks go under model0, model1, ... (megatron's convention); tensors are keyed by their global
        names, so a checkpoint loads under any TP x PP x VPP x DP layout.
        """
        models = self._model_sharded_state_dicts()
        if is_loading:
            _set_adam_steps(self.optimizer, present=True)
        optim_sd = self.optimizer.sharded_state_dict(  # finds each parameter's ShardedTensor in the nesting
            models,
            is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable"},
        )
        if is_loading:
            _set_adam_steps(self.optimizer, present=False)
        return {**models, "optimizer": optim_sd}

    def _model_sharded_state_dicts(self) -> dict[str, dict]:
        return {self._chunk_key(i): c.module.sharded_state_dict() for i, c in enumerate(self.chunks)}

    def _chunk_key(self, i: int) -> str:
        return f"model{i}" if len(self.chunks) > 1 else "model"

    def load_sharded_state_dict(self, state: dict) -> None:
        for i, c in enumerate(self.chunks):
            c.module.load_state_dict(state[self._chunk_key(i)])
        with _tolerate_missing_step(self.optimizer):
            self.optimizer.load_state_dict(state["optimizer"])
        _unshare_adam_steps(self.optimizer)

    def load_model_weights(self, ckpt: Path, keep: Callable[[str], bool]) -> None:
        """Only the model weights whose state key passes ``keep`` from checkpoint ``ckpt`` (any layout); the
        others keep their initialisation. The optimizer's own copies are refreshed from the model."""
        from megatron.core import dist_checkpointing

        models = self._model_sharded_state_dicts()
        wanted = {name: {k: v for k, v in sd.items() if keep(k)} for name, sd in models.items()}
        loaded = dist_checkpointing.load(wanted, str(ckpt))
        for i, c in enumerate(self.chunks):
            name = self._chunk_key(i)
            missing, unexpected = c.module.load_state_dict(loaded[name], strict=False)
            left_out = {k for k in models[name] if not keep(k)}
            if unexpected or not set(missing) <= left_out | {
                k for k in missing if k.endswith("_extra_state")
            }:
                raise RuntimeError(
                    f"weights from {ckpt} did not fit: missing {missing}, unexpected {unexpected}"
                )
        self.optimizer.reload_model_params()


def _set_adam_steps(optimizer: Any, present: bool) -> None:
    """Allocate Adam state with a `step` per parameter (present=True), or drop the `step`s again.

    megatron-core 0.16's DistributedOptimizer on its no-Apex/TE path (plain torch Adam) cannot describe
    what it is about to load: building its state dict asserts one common `step` across parameter states,
    but its init_state_fn creates exp_avg/exp_avg_sq without `step`. Its load then expects no `step` in
    the per-parameter state (it restores `step` from the param groups). So: steps in for the template,
    out for the load. The values are placeholders that the load overwrites.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if present:
            opt.init_state_fn(opt.optimizer, opt.config)
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                if present:
                    opt.optimizer.state[p].setdefault("step", torch.zeros((), dtype=torch.float32))
                else:
                    opt.optimizer.state[p].pop("step", None)


@contextlib.contextmanager
def _tolerate_missing_step(optimizer: Any) -> Iterator[None]:
    """Let megatron-core 0.16's DistributedOptimizer load its own checkpoint on the plain-torch-Adam path.

    Its load first restores `step` into every parameter's state (from the param groups), then copies
    each per-parameter state key from the checkpoint — which holds no `step` — and fails with
    KeyError('step'). We hand it the step it already restored (a self-copy) for the duration of the load.
    """
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        original = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if original is None:
            continue

        def set_states(
            model_param: Tensor, tensors: dict, opt: Any = opt, original: Callable = original
        ) -> None:
            group, order = opt.model_param_group_index_map[model_param]
            state = opt.optimizer.state[opt.optimizer.param_groups[group]["params"][order]]
            if "step" in state and "step" not in tensors:
                tensors = {**tensors, "step": state["step"].clone()}
            original(model_param, tensors)

        opt._set_main_param_and_optimizer_states = set_states
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states


def _unshare_adam_steps(optimizer: Any) -> None:
    """Give every parameter its own Adam `step` tensor after a load.

    megatron-core 0.16's DistributedOptimizer, on its no-Apex/TE path (plain torch Adam), restores one
    `step` tensor object into every parameter's state; torch Adam increments it in place once per
    parameter, so bias correction drifts after resume (measured: losses off by 0.43). Cloning restores
    the uninterrupted run exactly; tests/unit/test_trainer.py checks resume bit-exactness.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), Tensor):
                state["step"] = state["step"].clone()
