"""What a training run tells people: metrics.jsonl, TensorBoard, a progress bar or lines, PNG grids.

:class:`RunLog` is the one place the loop sends what it has measured (the loop itself never formats or writes):
- every record (a tick's means, a snapshot's metrics) is one JSON line of ``metrics.jsonl``, always;
- TensorBoard scalars too, in the run folder, when ``run.tensorboard`` allows and ``tensorboard`` is installed
  (``pip install 'gali[tensorboard]'``); the x axis is images seen (kimg·1000);
- each tick is a progress bar on a terminal (tqdm), else one plain line (``run.progress``): kimg, images/s, losses, ETA;
- image grids are PNGs under a stable name (``samples.png``) and a per-snapshot copy (``samples-0000040000.png``),
  and go to TensorBoard.
Records arrive as host values (the loop reads the step statistics once per tick): nothing here touches the device.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm import tqdm

from gali.engine.errors import ConfigError
from gali.engine.files import atomic_write, write_text_atomic
from gali.engine.loop.config import PROGRESS_MODES, TENSORBOARD_MODES
from gali.engine.loop.grids import save_image

# Record fields that describe where the run is rather than how it is doing: shown in their own
# places on the progress line (or not at all), never in the list of losses.
_PROGRESS_FIELDS = frozenset({"kimg", "epoch", "iteration", "images_per_s", "event"})
_BAR_FORMAT = "[{bar:20}] {desc}"  # the bar, then format_tick's line as tqdm's description


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` imports (it needs the ``tensorboard`` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_tensorboard(mode: str) -> bool:
    """Whether a run with ``run.tensorboard=mode`` writes TensorBoard events.

    'auto' writes them when the package is installed, 'off' never; 'on' without the package raises
    :class:`ConfigError`, so a run that was asked for TensorBoard fails before any work, not after.
    """
    if mode not in TENSORBOARD_MODES:
        raise ConfigError("run.tensorboard", f"got {mode!r}; accepted: {', '.join(TENSORBOARD_MODES)}")
    if mode == "off":
        return False
    available = tensorboard_available()
    if mode == "on" and not available:
        raise ConfigError(
            "run.tensorboard",
            "got 'on' but the tensorboard package is not installed; "
            "pip install 'gali[tensorboard]', or set run.tensorboard=auto or off",
        )
    return available


def resolve_progress(mode: str, stream: TextIO) -> str:
    """'bar' or 'lines' for ``run.progress=mode``: 'auto' draws a bar only when ``stream`` is a terminal."""
    if mode not in PROGRESS_MODES:
        raise ConfigError("run.progress", f"got {mode!r}; accepted: {', '.join(PROGRESS_MODES)}")
    if mode == "auto":
        return "bar" if stream.isatty() else "lines"
    return mode


def format_duration(seconds: float) -> str:
    """``3725`` -> ``'1h02m'``, ``65`` -> ``'1m05s'``, ``7`` -> ``'7s'``; '?' when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _format_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "/".join(f"{v:.2f}" for v in value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _abandon_records_after(path: Path, images: int) -> None:
    """Cut ``path`` (metrics.jsonl) at its first record past ``images`` (a resumed run's position), moving that
    tail to ``metrics.abandoned-<kimg>.jsonl`` beside it: the rerun's records then follow the resume point once."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    past = next((i for i, line in enumerate(lines) if json.loads(line).get("kimg", 0) * 1000 > images + 0.5), None)
    if past is None:
        return
    write_text_atomic(path.with_name(f"metrics.abandoned-{format_kimg(images / 1000)}.jsonl"), "".join(lines[past:]))
    write_text_atomic(path, "".join(lines[:past]))


def format_kimg(kimg: float) -> str:
    """kimg to the image (images are whole: three decimals tell every tick apart), trailing zeros dropped but one."""
    text = f"{kimg:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def format_tick(record: Mapping[str, Any], total_kimg: float) -> str:
    """One tick for people: kimg done of total, images/s, time left, epoch, then every statistic.

    ``record`` holds ``kimg`` and ``images_per_s`` and any statistics (floats, or lists such as
    ``p_true``, shown as ``0.25/0.24/...``); the time left assumes the last tick's speed. Progress
    comes first so that a bar cut to a narrow terminal still shows it.
    """
    kimg, speed = record["kimg"], record["images_per_s"]
    percent = 100 * min(kimg / total_kimg, 1.0)
    eta = (total_kimg - kimg) * 1000 / speed if speed > 0 else math.inf
    parts = [
        f"kimg {format_kimg(kimg)}/{total_kimg:g} ({percent:3.0f}%)",
        f"{speed:.1f} img/s",
        f"eta {format_duration(max(eta, 0.0))}",
    ]
    if "epoch" in record:
        parts.append(f"epoch {record['epoch']}")
    parts += [f"{name} {_format_value(value)}" for name, value in record.items() if name not in _PROGRESS_FIELDS]
    return "  ".join(parts)


class RunLog:
    """The run folder's logs and what the terminal shows, for one training run.

    ``log`` receives whole lines (messages, and ticks in 'lines' mode); the bar is drawn by tqdm on
    ``stream`` (default stdout), cut to the terminal's width. Messages printed while a bar is drawn
    clear it first and redraw it after, so the bar stays the last line. Call :meth:`close` at the end
    of the run.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        total_kimg: float,
        progress: str = "auto",
        tensorboard: bool = False,
        log: Callable[[str], None] = print,
        stream: TextIO | None = None,
        resume_images: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        if resume_images is not None:  # a resume from an older checkpoint: its later records are abandoned
            _abandon_records_after(self.run_dir / "metrics.jsonl", resume_images)
        self.total_kimg = total_kimg
        self._log = log
        self._text = (self.run_dir / "log.txt").open("a")  # every line shown, kept (StyleGAN's log.txt)
        self._stream = sys.stdout if stream is None else stream
        self.progress = resolve_progress(progress, self._stream)
        self._metrics = (self.run_dir / "metrics.jsonl").open("a")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # the steps after the resume point are dropped from the event files (the rerun writes them again)
            purge = None if resume_images is None else resume_images + 1
            self._writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge)
        self._bar: tqdm | None = None  # made at the first tick, so that it starts at the run's position

    @property
    def tensorboard(self) -> bool:
        """Whether TensorBoard events are being written."""
        return self._writer is not None

    def message(self, text: str) -> None:
        """A line for people (run folder, snapshots), printed above the bar when one is drawn."""
        self._keep(text)
        if self._bar is None:
            self._log(text)
            return
        self._bar.clear()
        self._log(text)
        self._bar.refresh()

    def record(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` to metrics.jsonl and send its numbers to TensorBoard.

        Numbers become scalars tagged with their field name, lists one scalar per element
        (``p_true/0``, ``p_true/1``, ...), at step round(kimg·1000); other fields go to JSONL only.
        """
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._writer is None:
            return
        step = round(record["kimg"] * 1000)
        for name, value in record.items():
            if name == "kimg":
                continue
            if isinstance(value, list | tuple):
                for i, element in enumerate(value):
                    self._writer.add_scalar(f"{name}/{i}", element, global_step=step)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(name, value, global_step=step)
        self._writer.flush()

    def tick(self, record: Mapping[str, Any]) -> None:
        """A tick's means: :meth:`record` it, then show it as the bar or as one line."""
        self.record(record)
        self._keep(format_tick(record, self.total_kimg))
        if self.progress != "bar":
            self._log(format_tick(record, self.total_kimg))
            return
        kimg, line = min(record["kimg"], self.total_kimg), format_tick(record, self.total_kimg)
        if self._bar is None:  # drawn at creation
            columns = shutil.get_terminal_size(fallback=(120, 24)).columns - 1
            self._bar = tqdm(
                total=self.total_kimg,
                initial=kimg,
                desc=line,
                file=self._stream,
                ncols=columns,
                bar_format=_BAR_FORMAT,
                ascii="-#",
                mininterval=0,
            )
            return
        self._bar.n = kimg
        self._bar.set_description_str(line)  # redraws

    def images(self, grids: Mapping[str, np.ndarray], images_seen: int) -> dict[str, Path]:
        """Write each (H, W, 3) uint8 grid as ``<name>.png`` and ``<name>-<images_seen:010d>.png``.

        The stable name always holds the latest grid; the numbered copies keep the history. Returns
        the stable paths by name. Grids also go to TensorBoard as images at step ``images_seen``.
        """
        written = {}
        for name, canvas in grids.items():
            numbered = save_image(canvas, self.run_dir / f"{name}-{images_seen:010d}.png")
            latest = atomic_write(self.run_dir / f"{name}.png", lambda tmp, src=numbered: shutil.copyfile(src, tmp))
            written[name] = latest
            if self._writer is not None:
                self._writer.add_image(name, canvas, global_step=images_seen, dataformats="HWC")
        if self._writer is not None:
            self._writer.flush()
        return written

    def _keep(self, line: str) -> None:
        self._text.write(line + "\n")
        self._text.flush()

    def end(self, reason: str, images_seen: int, *, resumable: bool) -> None:
        """Say in the run folder how the run ended ('done', 'stopped', 'failed'), for scripts that restart runs:
        a last metrics.jsonl record ``{"event": "end", ...}`` and ``status.json``."""
        checkpoints = sorted(self.run_dir.glob("checkpoint-*.pt"))
        status = {
            "event": "end",
            "reason": reason,
            "resumable": resumable,
            "kimg": images_seen / 1000,
            "checkpoint": checkpoints[-1].name if checkpoints else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.record(status)
        write_text_atomic(self.run_dir / "status.json", json.dumps(status, indent=2) + "\n")

    def close(self) -> None:
        """End the bar's line and close metrics.jsonl and the TensorBoard writer; safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._metrics.close()
        self._text.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class SilentRunLog:
    """What ranks other than 0 hold instead of a :class:`RunLog`: the same calls, nothing written or shown."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def message(self, text: str) -> None:
        pass

    def record(self, record: Mapping[str, Any]) -> None:
        pass

    def tick(self, record: Mapping[str, Any]) -> None:
        pass

    def end(self, reason: str, images_seen: int, *, resumable: bool) -> None:
        pass

    def images(self, grids: Mapping[str, np.ndarray], images_seen: int) -> dict[str, Path]:
        return {}

    def close(self) -> None:
        pass
