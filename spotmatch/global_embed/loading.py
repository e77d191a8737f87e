"""Batched image decoding for the embedder, in DataLoader workers.

A bad image must surface as one clear SpotmatchError in the main process. Exceptions raised inside
workers come back wrapped in a multi-line traceback, so decode errors travel as data instead and are
raised by `checked_batches`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import multiprocessing
import os
import select
import signal
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from spotmatch.data.images import ImageRecord, load_image
from spotmatch.errors import SpotmatchError
from spotmatch.global_embed.device_decode import EncodedJpeg, encoded_jpeg
from spotmatch.global_embed.model import EmbedderConfig
from spotmatch.global_embed.transforms import prepare_pixels, stack_images, to_tensor
from spotmatch.segmentation.background import RandomBackground

MaskFn = Callable[[ImageRecord], "np.ndarray | None"]


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    indices: list[int]
    errors: list[str] = field(default_factory=list)
    # JPEGs left for the device to decode (device_decode.decoded_on_device), and their dataset indices.
    encoded: list[EncodedJpeg] = field(default_factory=list)
    encoded_indices: list[int] = field(default_factory=list)

    def pin_memory(self) -> "Batch":
        """The DataLoader's pinning thread (pin_memory=True) calls this; without it a dataclass stays in
        pageable memory, and the non-blocking copy to the GPU blocks."""
        return dataclasses.replace(self, images=self.images.pin_memory())


class ImageTensorDataset(Dataset):
    def __init__(self, paths: list[Path], conf: EmbedderConfig, labels: list[int] | None = None,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None, mask_fn: MaskFn | None = None,
                 random_background: float = 0.0, decode_on_device: bool = False):
        self.paths, self.conf, self.augment, self.mask_fn = list(paths), conf, augment, mask_fn
        self.labels = labels if labels is not None else [-1] * len(self.paths)
        self.random_background = RandomBackground(p=random_background) if random_background > 0 else None
        # Plain JPEGs travel encoded, for device_decode.decoded_on_device; masks and augmentation need the CPU.
        self.decode_on_device = decode_on_device and mask_fn is None and augment is None and self.random_background is None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        if self.decode_on_device:
            try:
                encoded = encoded_jpeg(self.paths[index])
            except SpotmatchError as exc:
                return index, None, str(exc)
            if encoded is not None:
                return index, encoded, None
        return self.prepare(index)

    def prepare(self, index: int):
        """(index, (3, S, S) uint8 tensor, None), or (index, None, the one-line error) for a bad file."""
        try:
            # The input is at most image_size pixels a side; a masked crop keeps at least half of it.
            record = load_image(self.paths[index], draft_size=self.conf.image_size * 2)
        except SpotmatchError as exc:
            return index, None, str(exc)
        mask = self.mask_fn(record) if self.mask_fn else None
        if self.random_background is not None:
            # torch seeds each worker differently per epoch; numpy draws follow it
            rng = np.random.default_rng(torch.randint(0, 2**31, (1,)).item())
            record = dataclasses.replace(record, rgb=self.random_background(record.rgb, mask if mask is not None else record.mask, rng))
        pixels = prepare_pixels(record, self.conf, mask)
        image = to_tensor(pixels)
        return index, (image if self.augment is None else self.augment(image)), None


class _Collate:
    """Stack the decoded images; decode errors ride along to be raised in the main process."""

    def __init__(self, labels: list[int]):
        self.labels = labels

    def __call__(self, items) -> Batch:
        good = [(i, t) for i, t, e in items if e is None and not isinstance(t, EncodedJpeg)]
        encoded = [(i, t) for i, t, e in items if isinstance(t, EncodedJpeg)]
        errors = [e for _, _, e in items if e is not None]
        images = stack_images([t for _, t in good]) if good else torch.empty(0)
        return Batch(images, torch.tensor([self.labels[i] for i, _ in good], dtype=torch.long), [i for i, _ in good], errors,
                     [t for _, t in encoded], [i for i, _ in encoded])


def _single_threaded_worker(worker_id: int) -> None:
    """Each decoding process gets one thread: N workers x all-core thread pools oversubscribe the CPU."""
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def _exit_when_gone(owner_pid: int) -> None:
    """End this worker process as soon as process `owner_pid` (the one that made its loader) has exited,
    even by SIGKILL. Torch's own check only watches the worker's parent, here the fork server; and the fork
    server exits only once every one of its clients, workers included, has closed its copy of the server's
    "alive" pipe. So a killed command would leave the workers waiting for the server, the server waiting
    for the workers, and the resource tracker (whose pipe they all hold too) waiting for both, for good."""
    try:
        # A pidfd turns readable when the process exits, zombie or not, and costs nothing while waiting.
        owner_fd = os.pidfd_open(owner_pid)
    except ProcessLookupError:  # already gone before this worker got going
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd here (not Linux, or a kernel older than 5.3): poll instead
        owner_fd = None

    def wait_then_exit() -> None:
        if owner_fd is not None:
            select.select([owner_fd], [], [])
        else:
            while _is_running(owner_pid):
                time.sleep(1.0)
        # os._exit, not sys.exit: the main thread is blocked on a queue whose other end is gone
        os._exit(1)

    threading.Thread(target=wait_then_exit, name="exit-when-owner-gone", daemon=True).start()


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


@dataclass(frozen=True)
class _WorkerStart:
    """The DataLoader's worker_init_fn: a picklable callable, since the fork server's workers unpickle it."""
    owner_pid: int

    def __call__(self, worker_id: int) -> None:
        from spotmatch.data.images import quiet_large_photos

        _single_threaded_worker(worker_id)
        _exit_when_gone(self.owner_pid)
        quiet_large_photos()


def _forkserver() -> multiprocessing.context.BaseContext:
    """forkserver, not fork: a process that already ran thread pools (local matching, a web server) can
    deadlock in a forked child holding a copied lock. The server imports torch, OpenCV and this module
    once, before it forks any worker: otherwise every worker imports them itself, seconds per loader
    (4 s for two workers on 2 cores, against 0.3 s preloaded: benchmarks/bench_loader.py)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "cv2", __name__])  # takes effect when the server starts
    _start_forkserver_deaf_to_ctrl_c()
    return context


def _start_forkserver_deaf_to_ctrl_c() -> None:
    """Start the fork server (if it is not running) ignoring SIGINT. A terminal's Ctrl-C goes to the whole
    process group: the server, still importing its preloads, and the workers it forks would each print a
    KeyboardInterrupt traceback under the command's one-line message. An ignored signal stays ignored
    through exec and fork (a blocked one does not: the server starts with an empty mask), so this process
    alone handles Ctrl-C; the DataLoader then ends its workers, and the server ends with this process."""
    from multiprocessing import forkserver

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        forkserver.ensure_running()
        return
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()  # milliseconds: a Ctrl-C inside them is lost, not half-handled
    finally:
        signal.signal(signal.SIGINT, handler)


def make_loader(dataset: ImageTensorDataset, batch_size: int, num_workers: int, batch_sampler: Sampler | None = None,
                pin_memory: bool = False, persistent: bool = False) -> DataLoader:
    """A DataLoader of `Batch`es. `persistent` keeps the decoding processes between passes (training
    epochs) instead of starting new ones for each."""
    sizing = {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size}
    workers = dict(multiprocessing_context=_forkserver(), worker_init_fn=_WorkerStart(owner_pid=os.getpid()),
                   prefetch_factor=4, persistent_workers=persistent) if num_workers > 0 else {}
    return DataLoader(dataset, **sizing, num_workers=num_workers, collate_fn=_Collate(dataset.labels),
                      pin_memory=pin_memory, **workers)


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Hold a Ctrl-C until the block ends, then deliver it to the handler that was there. Interrupted half-way
    through starting its worker processes, this process would exit while a child is still unpickling queues
    whose semaphores that exit removes, and the child prints a FileNotFoundError traceback."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread receives signals
        yield
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)


def checked_batches(batches: Iterable[Batch]) -> Iterator[Batch]:
    """One pass over `batches` (a loader's); raises the first decode error as is."""
    with _ctrl_c_held():  # a loader starts its worker processes here (seconds while the fork server preloads)
        batches = iter(batches)
    for batch in batches:
        if batch.errors:
            raise SpotmatchError(batch.errors[0])
        yield batch


def threaded_batches(dataset: ImageTensorDataset, batch_size: int, threads: int) -> Iterator[Batch]:
    """Batches in order, decoded by `threads` threads of this process (PIL and OpenCV release the GIL
    while they decode and resize): for a process that must not start worker processes, such as a Ray
    actor holding a few CPUs. At most two batches per thread are decoded ahead, so memory stays bounded."""
    collate = _Collate(dataset.labels)

    def decode(start: int) -> Batch:
        return collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])

    starts = iter(range(0, len(dataset), batch_size))
    with ThreadPoolExecutor(threads) as pool:
        pending = deque(pool.submit(decode, start) for start in itertools.islice(starts, 2 * threads))
        while pending:
            batch = pending.popleft().result()
            pending.extend(pool.submit(decode, start) for start in itertools.islice(starts, 1))
            yield batch


def iterate_batches(dataset: ImageTensorDataset, batch_size: int, num_workers: int,
                    batch_sampler: Sampler | None = None, pin_memory: bool = False, threads: int = 0) -> Iterator[Batch]:
    """Batches in order (or as `batch_sampler` groups them), in one pass; with no worker processes and
    `threads` > 1, decoded in that many threads instead."""
    if num_workers == 0 and threads > 1 and batch_sampler is None:
        return checked_batches(threaded_batches(dataset, batch_size, threads))
    return checked_batches(make_loader(dataset, batch_size, num_workers, batch_sampler, pin_memory))
