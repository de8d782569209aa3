"""Progress on long work: tqdm on a terminal, a plain line every few seconds otherwise (logs, CI).

A newcomer should never stare at minutes of silence: training steps, evaluation
passes and generation all report here.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

PLAIN_EVERY_S = 10.0  # without a terminal: at most one line per this many seconds


def track(items: Iterable[T], total: int | None, desc: str, enabled: bool | None = None,
          per_item: int = 1) -> Iterator[T]:
  """Yield `items`, showing `desc i/total`; silent for passes that finish within PLAIN_EVERY_S.

  `enabled` defaults to process 0 only (the others of a multi-process run stay quiet).
  `per_item` counts each item as that many units (e.g. a chunk of tokens).
  """
  if enabled is None:
    import jax
    enabled = jax.process_index() == 0
  if not enabled:
    yield from items
    return
  if sys.stderr.isatty():
    from tqdm import tqdm
    with tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0,
              unit_scale=per_item if per_item > 1 else False) as bar:
      yield from bar
    return
  t0 = last = time.time()
  for i, item in enumerate(items, 1):
    yield item
    now = time.time()
    if now - last >= PLAIN_EVERY_S:
      left = (now - t0) / i * (total - i) if total else None
      print(f"{desc} {i * per_item}/{total * per_item if total else '?'}"
            + (f"  ~{left:.0f}s left" if left is not None else ""),
            file=sys.stderr, flush=True)
      last = now


class TrainingBar:
  """tqdm on a terminal (loss, tokens/s, time left); plain lines otherwise."""

  def __init__(self, total: int, initial: int, enabled: bool = True):
    self.enabled = enabled
    self.tty = sys.stderr.isatty() and enabled
    self.total, self.t0, self.initial = total, time.time(), initial
    if self.tty:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

  def update(self, step: int, loss: float, rate: float):
    if self.tty:
      self.bar.n = step
      self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")
      self.bar.refresh()
    elif self.enabled:
      done = step - self.initial
      left = (time.time() - self.t0) / max(done, 1) * (self.total - step)
      print(f"step {step}/{self.total}  loss {loss:.4f}  {rate:.0f} tok/s  ~{left:.0f}s left", file=sys.stderr,
            flush=True)

  def write(self, text: str):
    if self.tty:
      self.bar.write(text)
    elif self.enabled:
      print(text, file=sys.stderr, flush=True)

  def close(self):
    if self.tty:
      self.bar.close()
