"""training.hlo: the one reader of compiled programs (tests, benchmarks, train.py --compile_for).

Checked on small hand-written HLO modules in the compilers' text format, so each
count is known exactly.
"""

from training import hlo


def test_count_collectives_counts_async_pairs_once_and_marks_cond_branches():
  hlo_text = """HloModule m

%branch_a (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %all-reduce.2 = f32[4]{0} all-reduce(%p), channel_id=2, to_apply=%add
}

ENTRY %main (x: f32[4], c: s32[]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %all-reduce-start = f32[4]{0} all-reduce-start(%x), channel_id=1, to_apply=%add
  %all-reduce-done = f32[4]{0} all-reduce-done(%all-reduce-start)
  %c = s32[] parameter(1)
  ROOT %r = f32[4]{0} conditional(%c, %all-reduce-done, %x), branch_computations={%branch_a, %branch_b}
}
"""
  counts = hlo.count_collectives(hlo_text)
  assert counts.by_op["all-reduce"] == 2
  assert counts.total == 2
  assert counts.in_conditional == 1


_TPU_LIKE = """HloModule m

%fused_computation (p0: bf16[8,128]) -> bf16[8,128] {
  %p0 = bf16[8,128]{1,0} parameter(0)
  ROOT %n = bf16[8,128]{1,0} negate(%p0)
}

ENTRY %main (x: bf16[8,128], y: f32[1024]) -> bf16[8,128] {
  %x = bf16[8,128]{1,0} parameter(0)
  %y = f32[1024]{0} parameter(1)
  %copy-start = (f32[1024]{0}, f32[1024]{0}, u32[]) copy-start(%y)
  %copy-done = f32[1024]{0} copy-done(%copy-start)
  %fusion.1 = bf16[8,128]{1,0} fusion(%x), kind=kLoop, calls=%fused_computation, backend_config={"estimated_cycles":"1200"}
  ROOT %fusion.2 = bf16[8,128]{1,0} fusion(%fusion.1), kind=kLoop, calls=%fused_computation, backend_config={"estimated_cycles":"34"}
}
"""


def test_kernels_cycles_and_async_copies_of_a_tpu_program():
  # Async copies are memory moves, not kernels.
  assert [kernel.name for kernel in hlo.kernels(_TPU_LIKE)] == ["fusion.1", "fusion.2"]
  assert hlo.estimated_cycles(_TPU_LIKE) == 1200 + 34
  # One async copy of the f32[1024] operand: 4096 bytes, counted once.
  assert hlo.async_copy_bytes(_TPU_LIKE) == 4096
  # Each fusion reads and writes one bf16[8,128] (2048 bytes).
  assert hlo.entry_bytes(_TPU_LIKE) >= 4 * 2048


def test_programs_without_estimates_or_copies_count_zero():
  text = _TPU_LIKE.replace(', backend_config={"estimated_cycles":"1200"}', "").replace(
      ', backend_config={"estimated_cycles":"34"}', "")
  assert hlo.estimated_cycles(text) == 0
  assert hlo.async_copy_bytes(text.replace("copy-start(%y)", "copy(%y)")) == 0


def test_shape_bytes_and_fmt_bytes():
  assert hlo.shape_bytes("(f32[64]{0}, bf16[2,3]{1,0:T(8,128)})") == 64 * 4 + 6 * 2
  assert hlo.fmt_bytes(1.5e9) == "1.50 GB" and hlo.fmt_bytes(999) == "999 B"


_TPU_MEMORY_SPACES = """HloModule m

%fused_computation (p0: bf16[128,256]) -> bf16[128,256] {
  %p0 = bf16[128,256]{1,0:T(8,128)(2,1)} parameter(0)
  ROOT %n = bf16[128,256]{1,0:T(8,128)(2,1)} negate(%p0)
}

ENTRY %main (x: bf16[128,256], w: bf16[16,32]) -> bf16[128,256] {
  %x = bf16[128,256]{1,0:T(8,128)(2,1)} parameter(0)
  %w = bf16[16,32]{1,0:T(8,128)(2,1)} parameter(1)
  %slice-start = ((bf16[128,256]{1,0:T(8,128)(2,1)}), bf16[64,256]{1,0:T(8,128)(2,1)S(1)}, s32[]{:S(2)}) slice-start(%x), slice={[0:64], [0:256]}
  %slice-done = bf16[64,256]{1,0:T(8,128)(2,1)S(1)} slice-done(%slice-start)
  %copy-start = (bf16[16,32]{1,0:T(8,128)(2,1)}, bf16[16,32]{1,0:T(8,128)(2,1)S(1)}, u32[]{:S(2)}) copy-start(%w)
  %copy-done = bf16[16,32]{1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start)
  %fusion.1 = bf16[128,256]{1,0:T(8,128)(2,1)S(1)} fusion(%x), kind=kLoop, calls=%fused_computation
  ROOT %fusion.2 = bf16[128,256]{1,0:T(8,128)(2,1)} fusion(%fusion.1), kind=kLoop, calls=%fused_computation
}
"""


def test_stored_bytes_pads_to_the_layout_tile():
  # 32 channels take a 128-lane tile: four times the logical bytes.
  assert hlo.stored_bytes("bf16[8,16,16,32]{3,2,1,0:T(8,128)(2,1)}") == 8 * 16 * 16 * 128 * 2
  assert hlo.shape_bytes("bf16[8,16,16,32]{3,2,1,0:T(8,128)(2,1)}") == 8 * 16 * 16 * 32 * 2
  # The tile applies in layout order: here dimension 0 (3) is the most minor,
  # padded to 128 lanes, and dimension 1 (5) to 8 rows.
  assert hlo.stored_bytes("f32[3,5]{0,1:T(8,128)}") == 8 * 128 * 4
  assert hlo.stored_bytes("f32[64]{0:T(256)}") == 256 * 4
  # No tiles (GPU, CPU layouts), scalars: the logical bytes.
  assert hlo.stored_bytes("f32[64]{0}") == 256 and hlo.stored_bytes("s32[]{:S(2)}") == 4
  # Memory spaces: S(1) (TPU VMEM) and other nonzero ones are not device memory.
  assert hlo.device_memory_bytes("(f32[64]{0:S(1)}, f32[64]{0:S(0)}, f32[64]{0})") == 2 * 256


def test_hbm_traffic_leaves_out_on_chip_arrays_and_counts_each_copy_once():
  text = _TPU_MEMORY_SPACES
  row = 256 * 2  # one bf16[*, 256] row
  # The slice moves 64 of x's 128 rows; the copy moves w's 16 rows of 32
  # columns, padded to 128 lanes.
  assert hlo.async_copy_bytes(text) == 64 * row + 16 * 128 * 2
  # fusion.1 reads x from HBM and writes to VMEM (S(1)); fusion.2 reads VMEM and
  # writes HBM: two HBM passes over a bf16[128,256], plus the copies once.
  assert hlo.hbm_traffic_bytes(text) == 2 * 128 * row + hlo.async_copy_bytes(text)
  # Operand + result bytes of the kernels count every memory space.
  assert hlo.entry_bytes(text) == 4 * 128 * row
  # Without memory spaces and async copies (a GPU program) the two agree.
  plain = _TPU_LIKE.replace(
      "  %copy-start = (f32[1024]{0}, f32[1024]{0}, u32[]) copy-start(%y)\n"
      "  %copy-done = f32[1024]{0} copy-done(%copy-start)\n", "")
  assert hlo.hbm_traffic_bytes(plain) == hlo.entry_bytes(plain) == 4 * 2048
