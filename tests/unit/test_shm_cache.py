"""Unit tests of the tier-2 shared-memory step cache (one process, no process group).

Most tests use a synthetic :class:`FakeSource` so that they are fast and can count exactly
which positions were read; one test goes through ``make_step_data`` with the real dataset.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time

import pytest
import torch

from nemo_checkpointless.data import shm_cache
from nemo_checkpointless.data.cached_step_data import CachedStepData
from nemo_checkpointless.data.shm_cache import DataCoordinate, ShmStepCache, StaleOrCorrupt
from nemo_checkpointless.train import data as train_data

pytestmark = pytest.mark.timeout(120)

GBS, MBS, SEQ = 8, 2, 16
COORD = DataCoordinate(dp=0, cp=0, pp=0)


class FakeSource:
    """Deterministic micro-batches from consumed_samples; records every position it loads."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def micro_batches(self, consumed_samples: int) -> list[dict[str, torch.Tensor]]:
        self.calls.append(consumed_samples)
        out = []
        for m in range(GBS // MBS):
            base = (consumed_samples + m * MBS) * SEQ
            tokens = torch.arange(base, base + MBS * SEQ, dtype=torch.int64).reshape(MBS, SEQ)
            out.append({
                "tokens": tokens,
                "labels": tokens + 1,
                "loss_mask": torch.ones(MBS, SEQ, dtype=torch.float32) * (m + 1),
                "position_ids": torch.arange(SEQ).repeat(MBS, 1),
            })
        return out


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys()
        and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b)
    )


def make(tmp_path, *, loader: bool, source: FakeSource | None = None, job="job", cfg="cfg-a",
         timeout=5.0, prefetch=2, lookback=2, root=None, **kw):
    source = source if source is not None else FakeSource()
    factory_calls = []

    def factory():
        factory_calls.append(1)
        return source

    cache = ShmStepCache(str(root or tmp_path / "shm"), job, cfg, COORD)
    data = CachedStepData(factory, cache, global_batch_size=GBS, samples_per_step=GBS,
                          prefer_loader=loader, prefetch_steps=prefetch, lookback_steps=lookback,
                          read_timeout_s=timeout, **kw)
    data.factory_calls = factory_calls
    return data, source


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def _close_all(monkeypatch):
    made: list[CachedStepData] = []
    original = CachedStepData.__init__

    def tracking_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(CachedStepData, "__init__", tracking_init)
    yield
    for data in made:
        data.close()


# -- file format ----------------------------------------------------------------------------


def test_roundtrip_keeps_values_dtypes_and_shapes(tmp_path):
    cache = ShmStepCache(str(tmp_path), "job", "cfg", COORD)
    cache.probe()
    batches = [{
        "tokens": torch.randint(0, 4096, (2, 5)),
        "loss_mask": torch.rand(2, 5),
        "bf16": torch.rand(3).to(torch.bfloat16),
        "scalar": torch.tensor(7, dtype=torch.int32),
        "empty": torch.zeros(0, 4),
    }, {"tokens": torch.arange(3)}]
    size = cache.write(4, 32, batches)
    path = cache.path(4)
    assert os.path.basename(path) == "step-0000000004.batch"
    assert os.path.getsize(path) == size
    assert same(cache.read(4, 32), batches)
    assert cache.steps() == [4]
    assert not [n for n in os.listdir(cache.dir) if n.startswith(".tmp-")]


@pytest.mark.parametrize("values", [
    [0, 255], [0, 256], [0, 65535], [0, 65536], [-1, 5], [-32768, 32767], [-32769, 0],
    [-(2**31), 2**31 - 1], [0, 2**31], [-(2**40), 2**40], [7, 7],
])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_integers_are_stored_narrow_and_read_back_exactly(tmp_path, values, dtype):
    lo, hi = values
    if dtype == torch.int32 and not (-(2**31) <= lo and hi < 2**31):
        pytest.skip("does not fit int32")
    cache = ShmStepCache(str(tmp_path), "job", "cfg", COORD)
    cache.probe()
    t = torch.tensor([lo, hi, lo, hi] * 256, dtype=dtype).reshape(4, 256)
    cache.write(0, 0, [{"x": t}])
    back = cache.read(0, 0)[0]["x"]
    assert back.dtype == dtype and torch.equal(back, t)


def test_token_batches_take_a_third_of_their_in_memory_size(tmp_path):
    cache = ShmStepCache(str(tmp_path), "job", "cfg", COORD)
    cache.probe()
    tokens = torch.randint(0, 4096, (2, 2048))  # int64 ids < 65536, positions, float32 mask
    batches = [{"tokens": tokens, "labels": tokens.roll(-1), "loss_mask": torch.ones(2, 2048),
                "position_ids": torch.arange(2048).repeat(2, 1)} for _ in range(4)]
    in_memory = sum(t.numel() * t.element_size() for b in batches for t in b.values())
    size = cache.write(0, 0, batches)
    assert size < in_memory / 2.5


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize("where", ["magic", "version", "meta", "payload", "last"])
def test_flipped_byte_is_rejected(tmp_path, where):
    cache = ShmStepCache(str(tmp_path), "job", "cfg", COORD)
    cache.probe()
    cache.write(1, 8, FakeSource().micro_batches(8))
    size = os.path.getsize(cache.path(1))
    offset = {"magic": 0, "version": 8, "meta": 40, "payload": size // 2, "last": size - 1}[where]
    _flip(cache.path(1), offset)
    with pytest.raises(StaleOrCorrupt, match="magic|version|checksum"):
        cache.read(1, 8)


def test_truncated_and_empty_files_are_rejected(tmp_path):
    cache = ShmStepCache(str(tmp_path), "job", "cfg", COORD)
    cache.probe()
    cache.write(1, 8, FakeSource().micro_batches(8))
    os.truncate(cache.path(1), os.path.getsize(cache.path(1)) - 3)
    with pytest.raises(StaleOrCorrupt, match="length mismatch"):
        cache.read(1, 8)
    os.truncate(cache.path(1), 10)
    with pytest.raises(StaleOrCorrupt, match="truncated"):
        cache.read(1, 8)
    os.truncate(cache.path(1), 0)
    with pytest.raises(StaleOrCorrupt, match="empty"):
        cache.read(1, 8)
    with pytest.raises(FileNotFoundError):
        cache.read(2, 16)


@pytest.mark.parametrize("field", ["job_id", "config_hash", "coord", "step", "consumed_samples"])
def test_stale_header_is_rejected(tmp_path, field):
    writer = ShmStepCache(str(tmp_path), "job", "cfg", COORD)
    writer.probe()
    writer.write(1, 8, FakeSource().micro_batches(8))
    reader = ShmStepCache(str(tmp_path), "job", "cfg", COORD)
    step, consumed = 1, 8
    if field == "job_id":
        reader.job_id = "other-job"  # same directory, another job's header
    elif field == "config_hash":
        reader.config_hash = "cfg-b"
    elif field == "coord":
        reader.coord = DataCoordinate(dp=1, cp=0, pp=0)
    elif field == "step":
        os.replace(writer.path(1), writer.path(2))
        step, consumed = 2, 16
    else:
        consumed = 9
    with pytest.raises(StaleOrCorrupt, match=field):
        reader.read(step, consumed)


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    cache = ShmStepCache(str(tmp_path), "job", "cfg", COORD)
    cache.probe()
    old = FakeSource().micro_batches(8)
    cache.write(1, 8, old)
    real_write = os.write

    def half_then_enospc(fd, data):
        if len(data) > 64:
            real_write(fd, bytes(data)[:64])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(shm_cache.os, "write", half_then_enospc)
    new = [{k: v + 1 for k, v in b.items()} for b in old]
    with pytest.raises(OSError) as info:
        cache.write(1, 8, new)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert same(cache.read(1, 8), old)  # a reader never sees the half-written file
    assert os.listdir(cache.dir) == ["step-0000000001.batch"]


def test_prune_keeps_the_window_and_removes_dead_temp_files(tmp_path):
    cache = ShmStepCache(str(tmp_path), "job", "cfg", COORD)
    cache.probe()
    for step in range(8):
        cache.write(step, step * GBS, [{"tokens": torch.arange(4)}])
    stale_tmp = os.path.join(cache.dir, ".tmp-1-dead-step-0000000009.batch")
    fresh_tmp = os.path.join(cache.dir, ".tmp-2-live-step-0000000009.batch")
    for path in (stale_tmp, fresh_tmp):
        open(path, "wb").close()
    os.utime(stale_tmp, (time.time() - 3600, time.time() - 3600))
    assert cache.prune(keep_from=5) == 5
    assert cache.steps() == [5, 6, 7]
    assert not os.path.exists(stale_tmp) and os.path.exists(fresh_tmp)


def test_job_dirs_are_safe_names(tmp_path):
    assert shm_cache.safe_job_id("abc-1.2_x") == "abc-1.2_x"
    odd = shm_cache.safe_job_id("../../etc/passwd job")
    assert "/" not in odd and " " not in odd and not odd.startswith(".")
    assert shm_cache.safe_job_id("a/b") != shm_cache.safe_job_id("a_b")
    assert shm_cache.job_cache_dir(str(tmp_path), "j").startswith(str(tmp_path))


# -- loader and reader ------------------------------------------------------------------------


def test_reader_gets_identical_batches_without_reading_the_dataset(tmp_path):
    loader, loader_src = make(tmp_path, loader=True)
    reader, reader_src = make(tmp_path, loader=False)
    assert (loader.role, reader.role) == ("loader", "reader")
    reference = FakeSource()
    for step in range(6):
        c = step * GBS
        a = loader.micro_batches(c)
        b = reader.micro_batches(c)
        assert same(a, reference.micro_batches(c)) and same(a, b)
    assert reader_src.calls == [] and reader.factory_calls == []
    assert reader.stats.samples_read == 0 and reader.stats.steps_from_cache == 6
    # every position read exactly once by the one loader (prefetch included)
    wait_for(lambda: loader.cache.steps() == [3, 4, 5, 6, 7])
    assert sorted(loader_src.calls) == [s * GBS for s in range(8)]
    assert len(set(loader_src.calls)) == len(loader_src.calls)


def test_prefetch_stays_ahead_and_respects_the_end(tmp_path):
    loader, source = make(tmp_path, loader=True, prefetch=3, end_samples=5 * GBS)
    loader.micro_batches(0)
    wait_for(lambda: loader.cache.steps() == [0, 1, 2, 3])
    loader.micro_batches(3 * GBS)
    wait_for(lambda: loader.cache.steps() == [1, 2, 3, 4])  # no step 5: past end_samples
    time.sleep(0.1)
    assert max(source.calls) == 4 * GBS


def test_restarted_loader_reattaches_in_o1(tmp_path):
    far = 10_000 * GBS
    first, _ = make(tmp_path, loader=True)
    first.micro_batches(far)
    wait_for(lambda: first.cache.steps() == [10_000, 10_001, 10_002])
    first.close()  # the process died: its flock is gone, its files stay
    again, source = make(tmp_path, loader=True)
    assert again.role == "loader"
    t0 = time.perf_counter()
    batches = again.micro_batches(far)
    assert time.perf_counter() - t0 < 2.0
    assert same(batches, FakeSource().micro_batches(far))
    again.micro_batches(far + GBS)
    wait_for(lambda: 10_003 in again.cache.steps())
    assert source.calls == [10_003 * GBS]  # nothing before the resume point, nothing twice
    assert again.stats.steps_from_cache == 2 and again.stats.files_rejected == 0


def test_cache_of_another_config_is_rejected_and_rebuilt(tmp_path, caplog):
    old, _ = make(tmp_path, loader=True, cfg="cfg-a", prefetch=0)
    old.micro_batches(0)
    old.micro_batches(GBS)
    old.close()
    new, source = make(tmp_path, loader=True, cfg="cfg-b", prefetch=0)
    with caplog.at_level(logging.WARNING):
        assert same(new.micro_batches(GBS), FakeSource().micro_batches(GBS))
    assert "config_hash is 'cfg-a', expected 'cfg-b'" in caplog.text
    assert new.stats.files_rejected == 1 and source.calls == [GBS]
    checker = ShmStepCache(str(tmp_path / "shm"), "job", "cfg-b", COORD)
    assert same(checker.read(1, GBS), FakeSource().micro_batches(GBS))  # rebuilt for cfg-b


def test_flipped_byte_is_rejected_and_rebuilt_by_loader_and_reader(tmp_path, caplog):
    loader, _ = make(tmp_path, loader=True, prefetch=0)
    for step in range(3):
        loader.micro_batches(step * GBS)
    loader.close()
    cache = ShmStepCache(str(tmp_path / "shm"), "job", "cfg-a", COORD)
    for step in (1, 2):
        _flip(cache.path(step), os.path.getsize(cache.path(step)) - 7)
    new_loader, loader_src = make(tmp_path, loader=True, prefetch=0)
    reader, reader_src = make(tmp_path, loader=False, prefetch=0)
    with caplog.at_level(logging.WARNING):
        assert same(new_loader.micro_batches(GBS), FakeSource().micro_batches(GBS))
        assert same(reader.micro_batches(2 * GBS), FakeSource().micro_batches(2 * GBS))
    assert caplog.text.count("checksum mismatch") == 2
    assert loader_src.calls == [GBS] and reader_src.calls == [2 * GBS]
    assert same(cache.read(1, GBS), FakeSource().micro_batches(GBS))
    assert same(cache.read(2, 2 * GBS), FakeSource().micro_batches(2 * GBS))


def test_full_disk_falls_back_to_direct_loading(tmp_path, monkeypatch, caplog):
    def enospc(fd, chunks):
        raise OSError(errno.ENOSPC, "No space left on device")

    loader, loader_src = make(tmp_path, loader=True, prefetch=0)
    reader, reader_src = make(tmp_path, loader=False, prefetch=0, timeout=30.0)
    monkeypatch.setattr(shm_cache, "_write_all", enospc)
    with caplog.at_level(logging.WARNING):
        for step in range(3):
            a = loader.micro_batches(step * GBS)
            t0 = time.monotonic()
            b = reader.micro_batches(step * GBS)
            assert time.monotonic() - t0 < 5.0, "the reader must not wait out its timeout"
            assert same(a, b) and same(a, FakeSource().micro_batches(step * GBS))
    assert loader.role == "direct"
    assert "falling back to direct loading" in caplog.text and "No space left" in caplog.text
    assert loader_src.calls == reader_src.calls == [0, GBS, 2 * GBS]
    assert not [n for n in os.listdir(loader.cache.dir) if n.startswith(".tmp-")]


def test_unwritable_cache_dir_falls_back_to_direct_loading(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        data, source = make(tmp_path, loader=True, root=blocker / "shm")
        assert data.role == "direct"
        assert same(data.micro_batches(GBS), FakeSource().micro_batches(GBS))
    assert "is not usable" in caplog.text and source.calls == [GBS]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_cache_dir_falls_back_to_direct_loading(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        data, _ = make(tmp_path, loader=True, root=root)
        assert data.role == "direct"
        assert same(data.micro_batches(0), FakeSource().micro_batches(0))
    finally:
        root.chmod(0o700)


def test_reader_never_hangs_while_a_silent_loader_holds_the_role(tmp_path, caplog):
    cache = ShmStepCache(str(tmp_path / "shm"), "job", "cfg-a", COORD)
    cache.probe()
    fd = os.open(os.path.join(cache.dir, shm_cache.LOCK_NAME), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live loader that never writes
    try:
        reader, source = make(tmp_path, loader=True, timeout=3.0)
        assert reader.role == "reader"  # tp_rank 0 found the role taken
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING):
            assert same(reader.micro_batches(GBS), FakeSource().micro_batches(GBS))
        assert 3.0 <= time.monotonic() - t0 < 8.0
        assert "loading it directly" in caplog.text
        # once the loader failed it, the reader waits less before loading directly ...
        t0 = time.monotonic()
        reader.micro_batches(2 * GBS)
        assert time.monotonic() - t0 < 2.0
        assert reader.stats.waits_timed_out == 2 and reader.role == "reader"
        assert source.calls == [GBS, 2 * GBS]
        # ... and trusts it again as soon as its files arrive
        writer = ShmStepCache(str(tmp_path / "shm"), "job", "cfg-a", COORD)
        writer.write(3, 3 * GBS, FakeSource().micro_batches(3 * GBS))
        reader.micro_batches(3 * GBS)
        assert reader._wait_s == 3.0 and source.calls == [GBS, 2 * GBS]
    finally:
        os.close(fd)


def test_reader_takes_over_when_the_loader_is_gone(tmp_path, caplog):
    loader, _ = make(tmp_path, loader=True, prefetch=1)
    reader, source = make(tmp_path, loader=False, prefetch=1, timeout=0.3)
    for step in range(3):
        loader.micro_batches(step * GBS)
        reader.micro_batches(step * GBS)
    wait_for(lambda: 3 in loader.cache.steps())
    loader.close()  # dies after prefetching step 3
    with caplog.at_level(logging.WARNING):
        for step in range(3, 6):
            assert same(reader.micro_batches(step * GBS), FakeSource().micro_batches(step * GBS))
    assert reader.role == "loader" and reader.stats.takeovers == 1
    assert "takes over the loader role" in caplog.text
    assert 3 * GBS not in source.calls  # step 3 came from the dead loader's prefetch
    # the role is really held: another process (here: another open file) cannot take it
    fd = os.open(os.path.join(reader.cache.dir, shm_cache.LOCK_NAME), os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_a_rebuilt_data_object_in_the_same_process_keeps_the_loader_role(tmp_path):
    first, _ = make(tmp_path, loader=True)
    second, _ = make(tmp_path, loader=True)
    assert first.role == second.role == "loader"
    first.close()
    assert second.cache.try_lock()  # still held through the shared descriptor


def test_unaligned_position_loads_directly(tmp_path):
    data, source = make(tmp_path, loader=True)
    assert same(data.micro_batches(3), FakeSource().micro_batches(3))
    assert source.calls == [3]


# -- job id and digest ------------------------------------------------------------------------


def test_job_id_precedence(tmp_path):
    fp = "f" * 64
    resolve = train_data.resolve_job_id
    assert resolve(fp, job_id="given", env={"NCL_JOB_ID": "env"}) == "given"
    assert resolve(fp, env={"NCL_JOB_ID": "env", "NCL_RUN_ID": "r"}) == "env"
    run = resolve(fp, env={"NCL_RUN_ID": "r"}, run_dir=tmp_path)
    assert run.startswith("run-") and run == resolve(fp, env={"NCL_RUN_ID": "r"})
    assert run != resolve("e" * 64, env={"NCL_RUN_ID": "r"})  # another config, another id
    assert resolve(fp, env={}, run_dir=tmp_path).startswith("dir-")
    master = resolve(fp, env={"TORCHELASTIC_RUN_ID": "none", "MASTER_PORT": "1"})
    assert master.startswith("master-")
    assert resolve(fp, env={"TORCHELASTIC_RUN_ID": "abc"}).startswith("rdzv-")
    assert resolve(fp, env={}) == "cfg-" + fp[:16]


def test_local_batch_digest_is_56_bit_and_position_sensitive():
    batches = FakeSource().micro_batches(0)
    digest = train_data.local_batch_digest
    d0 = digest(batches, dp_rank=0)
    assert 0 <= d0 < 2**56 and d0 == digest(FakeSource().micro_batches(0), dp_rank=0)
    assert d0 != digest(batches, dp_rank=1)
    changed = [dict(b) for b in batches]
    changed[-1]["tokens"] = changed[-1]["tokens"].clone()
    changed[-1]["tokens"][-1, -1] += 1
    assert digest(changed, dp_rank=0) != d0
    a, b = FakeSource().micro_batches(0), FakeSource().micro_batches(GBS)
    swapped = digest(b, dp_rank=0) + digest(a, dp_rank=1)
    assert digest(a, dp_rank=0) + digest(b, dp_rank=1) != swapped
    as_int32 = [{**x, "tokens": x["tokens"].int()} for x in a]
    assert digest(as_int32, dp_rank=0) == digest(a, dp_rank=0)


# -- through make_step_data, with the real dataset ----------------------------------------------


def _coords(tp_rank: int, dp_rank: int = 0):
    from nemo_checkpointless.megatron.parallel import Coordinates

    return Coordinates(rank=tp_rank, world_size=2, tp_rank=tp_rank, tp_size=2, pp_rank=0,
                       pp_size=1, dp_rank=dp_rank, dp_size=1, cp_rank=0, cp_size=1)


def test_make_step_data_real_dataset(tmp_path, monkeypatch):
    from nemo_checkpointless.config import compose

    monkeypatch.setenv("NCL_DATA_CACHE", os.path.expanduser(
        "~/.cache/nemo_checkpointless/test-data"))
    overrides = ["checkpointless=tier2", f"checkpointless.data_cache.path={tmp_path}"]
    off = train_data.make_step_data(compose([]), _coords(0))
    assert isinstance(off, train_data.StepData)
    cfg = compose(overrides)
    loader = train_data.make_step_data(cfg, _coords(0), job_id="j")
    reader = train_data.make_step_data(cfg, _coords(1), job_id="j")
    assert (loader.role, reader.role) == ("loader", "reader")
    for step in range(3):
        assert same(loader.micro_batches(step * 8), off.micro_batches(step * 8))
        assert same(reader.micro_batches(step * 8), off.micro_batches(step * 8))
    assert reader.stats.samples_read == 0 and reader.stats.steps_from_cache == 3
    # same job id, another batch geometry: the files of step 1 are stale and rebuilt
    other = train_data.make_step_data(compose([*overrides, "data.global_batch_size=16"]),
                                      _coords(1), job_id="j")
    direct16 = train_data.make_step_data(compose(["data.global_batch_size=16"]), _coords(0))
    assert same(other.micro_batches(16), direct16.micro_batches(16))
    assert other.stats.files_rejected == 1 and other.stats.samples_read == 16
    # TP=1: no reader to feed, so no cache (the rank loads its own batches directly)
    from nemo_checkpointless.megatron.parallel import Coordinates

    alone = Coordinates(rank=0, world_size=1, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1,
                        dp_rank=0, dp_size=1, cp_rank=0, cp_size=1)
    assert isinstance(train_data.make_step_data(cfg, alone, job_id="j"), train_data.StepData)
