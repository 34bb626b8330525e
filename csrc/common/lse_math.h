// Log-sum-exp merge of two partial attention results over disjoint key sets (docs/design.md, Math),
// written once for host and device. Mirrored in Python by ring_ext.reference.merge_reference.
#pragma once

#include <cmath>

#include "host_device.h"

namespace ring_ext {

struct MergeWeights {
  float lse;  // merged log-sum-exp
  float w1;   // weight of the first partial output
  float w2;   // weight of the second partial output
};

// lse = max(l1, l2) + log1p(exp(-|l1 - l2|)); o = w1 * o1 + w2 * o2.
// Rows that saw no key carry lse = -inf: one such side gets weight 0; two give (-inf, 0, 0), never
// NaN.
RING_EXT_HOST_DEVICE MergeWeights merge_weights(float l1, float l2) {
  if (l1 == -INFINITY && l2 == -INFINITY) return {-INFINITY, 0.0f, 0.0f};
  const float hi = fmaxf(l1, l2);
  const float lse = hi + log1pf(expf(-fabsf(l1 - l2)));
  return {lse, expf(l1 - lse), expf(l2 - lse)};
}

}  // namespace ring_ext
