"""How closely two floating-point results of the same model must agree when they were computed
by different kernels: another row of a batch, another batch size, another CPU.

Bit-equality is the wrong promise there. oneDNN picks its kernels by instruction set (AVX2,
AVX-512, AMX), batch size and a row's place in the batch (rows blocked in tiles, vector
tails), and each may add a dot product's terms in another order. On an Intel Xeon with AMX
row 1 of a batch differed from row 0 by 3e-8 in probability; on AMD EPYC they were equal.
What stays bit-exact: the same computation on the same machine with the same batch (a resumed
run, a model loaded twice), exact operations (max, ReLU, copies, flips) and integers (the
uint8 pixels every input becomes).

The tolerances below are for probabilities of cnnkit's small networks (a few convolutions of
at most 3x3x96 = 864 terms, activations of order 1 after batchnorm):

- float32: reordering a sum of n terms changes it by at most about n * u * sum(|terms|) and
  typically by sqrt(n) * u * sum(|terms|) (u = 2**-24; Higham, "Accuracy and Stability of
  Numerical Algorithms", 2002, sections 2.8 and 3.1). With n = 864 the worst case is 5e-5 of
  a logit's scale per layer and the typical case 2e-6; a probability moves by at most half
  of the change of the logits (softmax's derivative is at most 1/2). So 1e-4: the worst case
  of the last layer, and about 3,000 times what was seen.
- bf16 (autocast on CPUs with native bf16): every activation is rounded to 8 significant
  bits (u = 2**-8). A 1-ulp float32 difference before that rounding can move an activation
  by a whole bf16 step, 0.4% of it, and such steps pass through the later layers: 2e-2,
  the bound the export checks and the server tests already use for bf16 against float32.
"""

from __future__ import annotations

PROB_ATOL = {"fp32": 1e-4, "bf16": 2e-2}
# Two classes whose probabilities are closer than this may swap places between kernels.
NEAR_TIE = 2 * PROB_ATOL["fp32"]
