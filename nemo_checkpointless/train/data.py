"""The data a rank needs for one step: its micro-batches, a pure function of consumed_samples."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Protocol

import torch

from ..config import DataConfig, RunConfig, data_cache_dir
from ..megatron.parallel import Coordinates

log = logging.getLogger(__name__)


class StepData:
    """Megatron's GPTDataset over an indexed dataset, positioned by ``consumed_samples``.

    The sample order depends only on ``data.seed``-derived shuffles and ``data.num_samples``
    (not on how many steps a run takes), so a run of 20 steps and one of 40 see the same
    first 20 global batches.
    """

    def __init__(self, cfg: DataConfig, seed: int, coords: Coordinates) -> None:
        from ..data import build_gpt_dataset, ensure_indexed_dataset, load_tokenizer

        self.cfg = cfg
        self.coords = coords
        tokenizer = load_tokenizer()
        cache_dir = data_cache_dir(cfg)
        prefix = cfg.path or ensure_indexed_dataset(cache_dir, tokenizer=tokenizer)
        self.dataset = build_gpt_dataset(
            prefix=prefix,
            seq_length=cfg.seq_length,
            num_samples=cfg.num_samples,
            seed=seed,
            cache_dir=cache_dir,
            tokenizer=tokenizer,
        )

    def micro_batches(self, consumed_samples: int) -> list[dict[str, torch.Tensor]]:
        """This DP rank's micro-batches of the global batch starting at ``consumed_samples``."""
        from ..data import collate, micro_batch_indices

        if consumed_samples + self.cfg.global_batch_size > len(self.dataset):
            raise IndexError(
                f"the dataset holds {len(self.dataset)} samples, but step needs up to "
                f"{consumed_samples + self.cfg.global_batch_size}; raise data.num_samples"
            )
        indices = micro_batch_indices(
            consumed_samples,
            self.cfg.global_batch_size,
            self.cfg.micro_batch_size,
            self.coords.dp_rank,
            self.coords.dp_size,
        )
        return [collate([self._sample(i) for i in mb]) for mb in indices]

    def _sample(self, index: int) -> dict[str, Any]:
        return self.dataset[index]


class StepSource(Protocol):
    """What the loop reads batches from: :class:`StepData` or the tier-2 ``CachedStepData``."""

    def micro_batches(self, consumed_samples: int) -> list[dict[str, torch.Tensor]]: ...


def make_step_data(
    cfg: RunConfig,
    coords: Coordinates,
    *,
    job_id: Optional[str] = None,
    run_dir: Optional[str | os.PathLike] = None,
) -> StepSource:
    """The data source the loop uses: direct loading, or with ``checkpointless.data_cache``
    on (tier 2 and up) one loader per data coordinate feeding its TP peers via shared memory.

    Args:
        cfg: the run's config.
        coords: this rank's coordinates.
        job_id: the job's id; when None, see :func:`resolve_job_id`. Every TP rank of a
            coordinate must end up with the same id (no collective is used to agree).
        run_dir: the run directory (Hydra's), one of the fallbacks for the job id.
    """
    cache_cfg = cfg.checkpointless.data_cache
    if not cache_cfg.enabled:
        return StepData(cfg.data, cfg.trainer.seed, coords)
    if coords.tp_size == 1:
        # no tensor-parallel peer to feed: the rank loads its own batches, positioned at
        # consumed_samples in O(1) by the sampler; the cache would only cost (writes, a
        # prefetch thread) without saving a read
        log.info("data cache off: tensor_model_parallel_size=1 leaves no reader to feed")
        return StepData(cfg.data, cfg.trainer.seed, coords)
    from ..data.cached_step_data import CachedStepData
    from ..data.shm_cache import DataCoordinate, ShmStepCache

    fingerprint = data_fingerprint(cfg, coords)
    jid = resolve_job_id(fingerprint, job_id=job_id, run_dir=run_dir)
    timeout = getattr(cache_cfg, "read_timeout_s", None)
    if timeout is None:  # the job's resolved timeouts (NCL_DATA_CACHE_TIMEOUT_S)
        from ..timeouts import Timeouts

        timeout = Timeouts.from_env().data_cache_read_s
    d = cfg.data
    cache = ShmStepCache(cache_cfg.path, jid, fingerprint,
                         DataCoordinate(coords.dp_rank, coords.cp_rank, coords.pp_rank))
    return CachedStepData(
        lambda: StepData(d, cfg.trainer.seed, coords),
        cache,
        global_batch_size=d.global_batch_size,
        samples_per_step=d.global_batch_size // coords.dp_size,
        prefer_loader=coords.tp_rank == 0,
        prefetch_steps=cache_cfg.prefetch_steps,
        lookback_steps=cache_cfg.lookback_steps,
        read_timeout_s=timeout,
        end_samples=cfg.trainer.max_steps * d.global_batch_size,
    )


def data_fingerprint(cfg: RunConfig, coords: Coordinates) -> str:
    """Hash of everything that determines a coordinate's batch bytes (config + dataset files).

    Equal on every TP rank of a job; different for another seed, batch geometry, DP size,
    tokenizer or dataset (files are identified by path, size and mtime: cheap, and a
    dataset rebuilt in place gets a new fingerprint).
    """
    from ..data import bundled_corpus_path, bundled_tokenizer_path
    from ..data.shm_cache import config_fingerprint

    d = cfg.data
    fields = {
        "seq_length": d.seq_length,
        "num_samples": d.num_samples,
        "global_batch_size": d.global_batch_size,
        "micro_batch_size": d.micro_batch_size,
        "seed": cfg.trainer.seed,
        "dp_size": coords.dp_size,
        "cp_size": coords.cp_size,
    }
    # StepData always tokenises with the bundled tokenizer; without data.path it reads the
    # dataset built from the bundled corpus. Identify files by stat (no tokenizer load, no
    # corpus hash), so that a reader never has to touch the dataset.
    if d.path:
        fields["prefix"] = os.path.realpath(d.path)
        files = [d.path + ".bin", d.path + ".idx", bundled_tokenizer_path()]
    else:
        fields["prefix"] = "bundled-corpus"
        files = [bundled_corpus_path(), bundled_tokenizer_path()]
    return config_fingerprint(fields, files)


def resolve_job_id(
    fingerprint: str,
    *,
    job_id: Optional[str] = None,
    run_dir: Optional[str | os.PathLike] = None,
    env: Optional[Mapping[str, str]] = None,
) -> str:
    """The job id naming the cache, the same on every rank of a job without a collective.

    Precedence: ``job_id``; ``$NCL_JOB_ID`` (set by ncl-launch); else a hash of the data
    ``fingerprint`` with the first of ``$NCL_RUN_ID``, ``run_dir``, torchrun's
    ``$TORCHELASTIC_RUN_ID`` (unless ``none``), ``$MASTER_ADDR:$MASTER_PORT``; else the
    fingerprint alone. A process restarted into the same job gets the same id, so it
    reattaches to the job's cache. Two jobs sharing an id share files only if their
    fingerprints match, in which case the bytes are the same anyway.
    """
    env = os.environ if env is None else env
    if job_id:
        return job_id
    if env.get("NCL_JOB_ID"):
        return env["NCL_JOB_ID"]
    rdzv = env.get("TORCHELASTIC_RUN_ID")
    port = env.get("MASTER_PORT")
    master = f"{env.get('MASTER_ADDR', '')}:{port}" if port else None
    for label, value in (
        ("run", env.get("NCL_RUN_ID")),
        ("dir", os.path.realpath(run_dir) if run_dir else None),
        ("rdzv", rdzv if rdzv and rdzv != "none" else None),
        ("master", master),
    ):
        if value:
            return f"{label}-" + hashlib.sha256(f"{fingerprint}\0{value}".encode()).hexdigest()[:16]
    return f"cfg-{fingerprint[:16]}"


def local_batch_digest(micro_batches: Sequence[Mapping[str, torch.Tensor]], *, dp_rank: int) -> int:
    """56-bit digest of this rank's tokens for the step, for the data-correctness record.

    sha256 over ``dp_rank`` and every micro-batch's ``tokens`` (shape + little-endian int64
    values, in order). Summing it over the DP ranks with one int64 ``all_reduce`` gives the
    step's global-batch digest: it changes if any token changes, and (since ``dp_rank`` is
    hashed) if two DP ranks swap batches. Exact for up to 127 DP ranks; beyond that the sum
    wraps modulo 2**64, still deterministic.
    """
    digest = hashlib.sha256(b"ncl-batch-digest-v1\0")
    digest.update(int(dp_rank).to_bytes(8, "little", signed=False))
    for batch in micro_batches:
        tokens = batch["tokens"].detach().to(device="cpu", dtype=torch.int64).contiguous()
        digest.update(repr(tuple(tokens.shape)).encode())
        digest.update(tokens.numpy().astype("<i8", copy=False).tobytes())
    return int.from_bytes(digest.digest()[:7], "little")
