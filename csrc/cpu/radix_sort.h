// Stable LSD radix sort of (key, payload) pairs, used to order boxes by score and group them by class.
// Stability is what makes ties break by original index, as torch.sort(stable=True) does.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

namespace fastnn::cpu {

// Sorts `keys` ascending, carrying `payload`, looking only at the low `key_bits` bits.
template <typename Key>
void radix_sort_pairs(std::vector<Key>& keys, std::vector<int64_t>& payload, int key_bits) {
  constexpr int kDigitBits = 11;  // 3 passes for 32-bit keys; a 2048-entry histogram stays in L1
  constexpr size_t kBuckets = size_t(1) << kDigitBits;
  const size_t n = keys.size();
  if (n < 2 || key_bits <= 0) return;
  std::vector<Key> keys_tmp(n);
  std::vector<int64_t> payload_tmp(n);
  std::vector<size_t> count(kBuckets);
  for (int shift = 0; shift < key_bits; shift += kDigitBits) {
    std::fill(count.begin(), count.end(), 0);
    for (size_t i = 0; i < n; ++i) count[(keys[i] >> shift) & (kBuckets - 1)]++;
    size_t sum = 0;
    for (size_t b = 0; b < kBuckets; ++b) {
      size_t c = count[b];
      count[b] = sum;
      sum += c;
    }
    for (size_t i = 0; i < n; ++i) {
      size_t dst = count[(keys[i] >> shift) & (kBuckets - 1)]++;
      keys_tmp[dst] = keys[i];
      payload_tmp[dst] = payload[i];
    }
    keys.swap(keys_tmp);
    payload.swap(payload_tmp);
  }
}

// Maps a float (F = float / double, U = the unsigned integer of its size) to a key whose ascending order is
// the float's DESCENDING order. -0.0 and +0.0 map to the same key (they compare equal, so they must tie).
template <typename F, typename U>
inline U descending_key_bits(F f) {
  constexpr U kSign = U(1) << (sizeof(U) * 8 - 1);
  if (f == F(0)) f = F(0);
  U u;
  std::memcpy(&u, &f, sizeof(u));
  u = (u & kSign) ? ~u : (u | kSign);
  return ~u;
}

inline uint32_t descending_key(float f) { return descending_key_bits<float, uint32_t>(f); }
inline uint64_t descending_key(double f) { return descending_key_bits<double, uint64_t>(f); }

}  // namespace fastnn::cpu
