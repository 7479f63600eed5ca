"""What a compiled XLA program holds: kernels, collectives, convolutions, bytes.

One reader of the optimized HLO text (`jax.jit(...).lower(...).compile().as_text()`)
for the tests, the benchmarks and `train.py --compile_for`, on every compiler
(XLA:CPU, XLA:GPU, the TPU compiler):

* `count_collectives`: collective ops by kind, an async pair
  (`all-reduce-start` / `-done`) counted once, and how many sit in a branch of a
  `conditional` (they run only when that branch is taken);
* `collectives`: each collective with the bytes of its operands on one device;
* `kernels`: the entry computation's launched ops (fusions, library calls,
  unfused ops), i.e. what a GPU runs as kernels one after the other;
* `entry_bytes`: operand + result bytes of those ops, an estimate of the
  memory traffic of a program whose compiler reports none (XLA:GPU's
  `cost_analysis()` returns None);
* `hbm_traffic_bytes`: the same, counting only arrays kept in device memory (HBM), in
  the bytes their tiled layouts take, plus the async copies between HBM and a
  TPU's on-chip memory once each (`async_copy_bytes`);
* `convolutions`: convolution ops (cuDNN calls on GPU, `convolution` ops in
  fusions on TPU and CPU).
"""

from __future__ import annotations

import collections
import math
import re
from typing import NamedTuple

COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                  "all-to-all")
# Ops of the entry computation that launch no kernel of their own.
# Async copies between memory spaces (`copy-start`, TPU prefetches) count as
# traffic, not kernels.
_BOOKKEEPING = {"copy-start", "slice-start", "parameter", "constant", "get-tuple-element",
                "tuple", "bitcast", "after-all", "partition-id", "replica-id", "opt-barrier",
                "add-dependency", "conditional", "while", "call", "domain"}
_BYTES_PER_ELEMENT = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                      "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                      "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_COLLECTIVE = re.compile(r"\s(" + "|".join(COLLECTIVE_OPS) + r")(-start)?\(")
_INSTRUCTION = re.compile(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")


def computations(hlo_text: str) -> dict[str, str]:
  """Computation name -> body text of an HLO module's text."""
  bodies, name, lines = {}, None, []
  for line in hlo_text.splitlines():
    header = re.match(r"(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)
    if name is None and header:
      name, lines = header.group(1), []
    elif name is not None and line.startswith("}"):
      bodies[name] = "\n".join(lines)
      name = None
    elif name is not None:
      lines.append(line)
  return bodies


def entry_name(hlo_text: str) -> str | None:
  match = re.search(r"^ENTRY\s+%([\w.\-]+)", hlo_text, re.M)
  return match.group(1) if match else None


def shape_bytes(shape_text: str) -> int:
  """Bytes of an HLO shape, e.g. `'(f32[64]{0}, bf16[2,3]{1,0:T(8,128)})'` -> 268."""
  return sum(math.prod(int(d) for d in dims.split(",") if d) * _BYTES_PER_ELEMENT[dtype]
             for dtype, dims in _ARRAY.findall(shape_text) if dtype in _BYTES_PER_ELEMENT)


class Instruction(NamedTuple):
  """One instruction of a computation.

  Attributes:
    name: without the `%`.
    op: the opcode, e.g. 'fusion', 'custom-call', 'all-reduce-start'.
    result_bytes: bytes of its result shape.
    operands: names of its operands.
    text: the whole line.
    shape: its result shape with layouts, e.g. `bf16[8,128]{1,0:T(8,128)(2,1)S(1)}`.
  """
  name: str
  op: str
  result_bytes: int
  operands: tuple[str, ...]
  text: str
  shape: str


def instructions(body: str) -> list[Instruction]:
  """The instructions of one computation's body text, in order."""
  found = []
  for line in body.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, op, rest = match.groups()
    # Operands end at the first `)` that closes the operand list.
    depth, end = 1, len(rest)
    for i, char in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(char, 0)
      if depth == 0:
        end = i
        break
    operands = tuple(re.findall(r"%([\w.\-]+)", rest[:end]))
    found.append(Instruction(name, op, shape_bytes(shape), operands, line, shape))
  return found


def _branch_computations(bodies: dict[str, str]) -> set[str]:
  """Computations that run only inside a branch of a `conditional`."""
  branches = set()
  for body in bodies.values():
    for match in re.finditer(
        r"branch_computations=\{([^}]*)\}|(?:true|false)_computation=%([\w.\-]+)", body):
      names = match.group(1) or match.group(2)
      branches.update(n.strip().lstrip("%") for n in names.split(","))
  pending = list(branches)
  while pending:
    body = bodies.get(pending.pop(), "")
    for callee in re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", body):
      if callee not in branches:
        branches.add(callee)
        pending.append(callee)
  return branches


class CollectiveCount(NamedTuple):
  """Collective ops of one compiled program.

  Attributes:
    by_op: op name -> count, for every name in `COLLECTIVE_OPS`.
    in_conditional: how many of them sit in a branch of a `conditional`
      (they run only when that branch is taken).
  """
  by_op: dict[str, int]
  in_conditional: int

  @property
  def total(self) -> int:
    return sum(self.by_op.values())

  def summary(self) -> str:
    parts = [f"{n} {op}" for op, n in self.by_op.items() if n]
    text = str(self.total) + (f" ({', '.join(parts)})" if parts else "")
    if self.in_conditional:
      text += f"; {self.in_conditional} in a lax.cond branch"
    return text


def count_collectives(hlo_text: str) -> CollectiveCount:
  """Counts collective ops in compiled HLO text (`compile().as_text()`).

  An async pair (`all-reduce-start` / `all-reduce-done`) counts once, through
  its `-start` op. An op is matched as ` name(` after the result shape, which
  instruction names (`%all-reduce.1`) and metadata never look like.
  """
  counts = collections.Counter(m.group(1) for m in _COLLECTIVE.finditer(hlo_text))
  bodies = computations(hlo_text)
  in_conditional = sum(len(_COLLECTIVE.findall(bodies.get(b, "")))
                       for b in _branch_computations(bodies))
  return CollectiveCount({op: counts.get(op, 0) for op in COLLECTIVE_OPS}, in_conditional)


class Collective(NamedTuple):
  """One collective op of a compiled program.

  Attributes:
    op: e.g. 'all-reduce' (an async `-start` op under its plain name).
    nbytes: bytes of its result on one device (for an all-reduce, of its
      operands too).
    in_conditional: it sits in a branch of a `conditional`.
    source: the `source_file` of its metadata ('' when absent).
  """
  op: str
  nbytes: int
  in_conditional: bool
  source: str


def collectives(hlo_text: str) -> tuple[Collective, ...]:
  """Every collective op of compiled HLO text, computation by computation."""
  bodies = computations(hlo_text)
  branches = _branch_computations(bodies)
  found = []
  for name, body in bodies.items():
    for inst in instructions(body):
      op = inst.op.removesuffix("-start")
      if op not in COLLECTIVE_OPS:
        continue
      nbytes = inst.result_bytes
      if inst.op.endswith("-start") and op == "all-reduce":
        nbytes = shape_bytes(inst.text.split("=", 1)[1].split(" all-reduce-start(")[0])
      source = re.search(r'source_file="([^"]*)"', inst.text)
      found.append(Collective(op, nbytes, name in branches,
                              source.group(1) if source else ""))
  return tuple(found)


def kernels(hlo_text: str) -> list[Instruction]:
  """The entry computation's ops that launch work: fusions, library calls, unfused ops.

  Bookkeeping ops (parameters, tuples, bitcasts, constants), the `-done` half
  of async pairs and control flow (`conditional`, `while`, whose bodies run
  their own kernels) are left out.
  """
  return [inst for inst in _entry_instructions(hlo_text) if _is_kernel(inst)]


def _entry_instructions(hlo_text: str) -> list[Instruction]:
  return instructions(computations(hlo_text).get(entry_name(hlo_text), ""))


def _is_kernel(inst: Instruction) -> bool:
  return inst.op not in _BOOKKEEPING and not inst.op.endswith("-done")


def entry_bytes(hlo_text: str) -> int:
  """Operand + result bytes of the entry computation's kernels (`kernels`).

  Each launched op reads its operands from and writes its result to device
  memory once: an estimate of a step's memory traffic that ignores caches
  (a re-read from L2 counts in full) and what a library call (cuDNN, cuBLAS)
  reads more than once internally.
  """
  entry = _entry_instructions(hlo_text)
  sizes = {inst.name: inst.result_bytes for inst in entry}
  total = 0
  for inst in filter(_is_kernel, entry):
    result = inst.result_bytes
    if inst.op.endswith("-start"):
      # An async op's result holds its operands too; count the data once.
      result = 0
    total += result + sum(sizes.get(operand, 0) for operand in inst.operands)
  return total


_CUDNN_CONV = re.compile(r'custom_call_target="__cudnn\$conv')


def convolutions(hlo_text: str) -> int:
  """Convolution ops of compiled HLO: cuDNN calls, and `convolution` ops in any computation."""
  ops = sum(1 for line in hlo_text.splitlines()
            if re.search(r"\sconvolution\(", line) and "=" in line)
  return ops + len(_CUDNN_CONV.findall(hlo_text))


_ESTIMATED_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')


def estimated_cycles(hlo_text: str) -> int:
  """Sum of the TPU compiler's per-kernel `estimated_cycles` (0 on other compilers)."""
  return sum(int(m.group(1)) for k in kernels(hlo_text)
             for m in [_ESTIMATED_CYCLES.search(k.text)] if m)


# A layout's memory space other than device memory (0), e.g. `S(1)`: TPU VMEM.
_MEMORY_SPACE = re.compile(r"S\(([1-9]\d*)\)")
# One array of a shape with its layout, e.g. `bf16[8,128]{1,0:T(8,128)(2,1)S(1)}`.
_LAID_OUT_ARRAY = re.compile(r"\b[a-z]\w*\[[\d,]*\](?:\{[^}]*\})?")


def async_copy_bytes(hlo_text: str) -> int:
  """Bytes moved by the entry computation's async copies (`copy-start`, `slice-start`).

  On TPUs these are the memory-space assignment's prefetches into and
  evictions out of on-chip memory (VMEM). Each copy counts once, by what it
  moves: the destination array of its result, `(source, destination, context)`
  (a `slice-start` moves one slice of its operand, not the whole array), in
  `stored_bytes`.
  """
  return sum(stored_bytes(_LAID_OUT_ARRAY.findall(inst.shape)[1])
             for inst in _entry_instructions(hlo_text)
             if inst.op in ("copy-start", "slice-start"))


def stored_bytes(shape_text: str) -> int:
  """Bytes the arrays of an HLO shape occupy in memory, their layouts' tiling included.

  A TPU layout's first tile, e.g. `T(8,128)` in `bf16[8,16,16,32]{3,2,1,0:T(8,128)(2,1)}`,
  pads the array's minor dimensions (in layout order) to multiples of the tile:
  the 32 channels above take 128 lanes, four times `shape_bytes`. Without
  tiles (GPU and CPU layouts) this is `shape_bytes`.
  """
  return sum(_stored_array_bytes(array) for array in _LAID_OUT_ARRAY.findall(shape_text))


def _stored_array_bytes(array_text: str) -> int:
  match = re.fullmatch(r"([a-z]\w*)\[([\d,]*)\](?:\{([\d,]*)(?::([^}]*))?\})?", array_text)
  if not match or match.group(1) not in _BYTES_PER_ELEMENT:
    return shape_bytes(array_text)
  dtype, dims_text, minor_to_major, layout = match.groups()
  dims = [int(d) for d in dims_text.split(",") if d]
  tile = re.match(r"T\(([\d,]+)\)", layout or "")
  if tile and minor_to_major:
    physical = [dims[int(i)] for i in reversed(minor_to_major.split(","))]  # major..minor
    for k, size in enumerate(reversed([int(t) for t in tile.group(1).split(",")]), start=1):
      if k <= len(physical):
        physical[-k] = -(-physical[-k] // size) * size
    dims = physical
  return math.prod(dims) * _BYTES_PER_ELEMENT[dtype]


def device_memory_bytes(shape_text: str) -> int:
  """Bytes (`stored_bytes`) of the arrays of an HLO shape that live in device memory (HBM).

  A layout's `S(n)` with n > 0 names another memory space (on TPUs `S(1)` is
  the on-chip VMEM); arrays without one are in device memory.
  """
  return sum(_stored_array_bytes(array) for array in _LAID_OUT_ARRAY.findall(shape_text)
             if not _MEMORY_SPACE.search(array))


# Custom calls that move no data: XLA:TPU's view of adjacent prefetched slices as one array.
_NO_TRAFFIC_CALLS = re.compile(r'custom_call_target="ConcatBitcast"')


def hbm_traffic_bytes(hlo_text: str) -> int:
  """Device-memory (HBM) bytes a compiled program reads and writes, by where it keeps each array.

  Like `entry_bytes`, each kernel (`kernels`) reads its operands and writes its
  result once, in `stored_bytes` (tiled layouts' padding included), but only
  arrays in device memory count: on TPUs the compiler's
  memory-space assignment keeps some in on-chip VMEM (`S(1)` in their layouts),
  whose reads and writes are not HBM traffic, and moves them with async copies
  (`copy-start`, `slice-start`), which count once each (`async_copy_bytes`: one
  side of each copy is HBM). On GPUs (one memory space, no such copies) this is
  `entry_bytes`.

  The TPU compiler's own `cost_analysis()['bytes accessed']` counts differently:
  every operand and result of every kernel (in `stored_bytes`), VMEM included,
  and each `copy-start` four times (its operand, the two arrays of its result,
  the `copy-done`); `tests/training/test_compiled.py` checks that account
  against the compiler's.
  """
  entry = _entry_instructions(hlo_text)
  shapes = {inst.name: inst.shape for inst in entry}
  total = async_copy_bytes(hlo_text)
  for inst in filter(_is_kernel, entry):
    if _NO_TRAFFIC_CALLS.search(inst.text):
      continue
    result = 0 if inst.op.endswith("-start") else device_memory_bytes(inst.shape)
    total += result + sum(device_memory_bytes(shapes.get(operand, ""))
                          for operand in inst.operands)
  return total


def fmt_bytes(num: float) -> str:
  """`1.5e9` -> `'1.50 GB'` (decimal units)."""
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
    if num >= scale:
      return f"{num / scale:.2f} {unit}"
  return f"{int(num)} B"


class ArrayTraffic(NamedTuple):
  """Full-size passes over memory of a compiled program (see `array_traffic`)."""
  reads: int
  writes: int
  read_bytes: int
  write_bytes: int


def array_traffic(hlo_text: str, num_elements: int) -> ArrayTraffic:
  """Full-size reads and writes of the entry computation of compiled HLO.

  Counts, over the top-level ops (fusions, custom fusions, copies...), the
  operands and results with at least `num_elements` elements: each is one
  pass over memory of an array of that size, weighed in bytes by its dtype (a
  bf16 input read once is half an f32 intermediate read once). Parameters,
  tuples, bitcasts and `conditional` ops (a branch runs only when taken) are
  not counted.
  """
  bodies = computations(hlo_text)
  entry = next((name for name in bodies
                if re.search(r"^ENTRY\s+%" + re.escape(name) + r"\b", hlo_text, re.M)), None)
  if entry is None:
    return ArrayTraffic(0, 0, 0, 0)
  sizes, reads, writes, read_bytes, write_bytes = {}, 0, 0, 0, 0
  for line in bodies[entry].splitlines():
    match = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)", line)
    if not match:
      continue
    name, shape, op, rest = match.groups()
    arrays = [(math.prod(int(d) for d in dims.split(",") if d),
               _BYTES_PER_ELEMENT.get(dtype, 4))
              for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape)]
    # The largest array of the result: (elements, bytes).
    sizes[name] = max(((e, e * width) for e, width in arrays), default=(1, 4))
    if op in ("parameter", "get-tuple-element", "tuple", "bitcast", "constant",
              "conditional"):
      continue
    operands = [sizes.get(operand, (0, 0))
                for operand in re.findall(r"%([\w.\-]+)", rest.split("), ")[0])]
    full_operands = [size for size in operands if size[0] >= num_elements]
    full_results = [(e, e * width) for e, width in arrays if e >= num_elements]
    reads += len(full_operands)
    writes += len(full_results)
    read_bytes += sum(nbytes for _, nbytes in full_operands)
    write_bytes += sum(nbytes for _, nbytes in full_results)
  return ArrayTraffic(reads, writes, read_bytes, write_bytes)


def array_passes(hlo_text: str, num_elements: int) -> tuple[int, int]:
  """`(reads, writes)` of `array_traffic`: full-size passes of compiled HLO."""
  traffic = array_traffic(hlo_text, num_elements)
  return traffic.reads, traffic.writes
