// Best-fit packing of tokenized documents into BOS-aligned rows: torch.ops.nanotrain.best_fit_pack (CPU).
//
// The rule is the one of nanotrain/ops/packing.py (its `reference` is the spec, and the tests compare the
// two output for output): fill each row by taking whole the longest unused document that fits the space
// left (ties: lowest index); when none fits, crop the shortest unused one (ties: lowest index) to fill the
// row; when the documents run out mid-row, abandon that row (its documents stay unused) and return.
//
// Why it is fast: within one call documents are only ever taken, never put back (an abandoned row ends the
// call), and every pick takes the lowest index of some length. So documents of length <= row_len sit in
// per-length queues (a counting sort, ascending index), a two-level bitmap over lengths answers "longest
// non-empty length <= space" and "shortest non-empty length" in a few word operations, and the documents
// longer than a row sit in one queue sorted by (length, index). A pick is O(1) amortised plus a bitmap scan
// of row_len / 4096 words at most; the Python reference scans every document for every pick.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace nanotrain {
namespace {

// A set of integers in [0, n) with fast "largest member <= v" and "smallest member" queries.
class LengthSet {
 public:
  explicit LengthSet(int64_t n) : words_((n + 63) / 64, 0), summary_((words_.size() + 63) / 64, 0) {}

  void insert(int64_t v) {
    words_[v >> 6] |= bit(v & 63);
    summary_[v >> 12] |= bit((v >> 6) & 63);
  }

  void erase(int64_t v) {
    uint64_t& w = words_[v >> 6];
    w &= ~bit(v & 63);
    if (w == 0) {
      summary_[v >> 12] &= ~bit((v >> 6) & 63);
    }
  }

  // The largest member <= v, or -1 when there is none.
  int64_t prev(int64_t v) const {
    const int64_t wi = v >> 6;
    const uint64_t w = words_[wi] & up_to(v & 63);
    if (w != 0) {
      return (wi << 6) + highest(w);
    }
    int64_t si = wi >> 6;
    uint64_t s = summary_[si] & below(wi & 63);
    while (true) {
      if (s != 0) {
        const int64_t w2 = (si << 6) + highest(s);
        return (w2 << 6) + highest(words_[w2]);
      }
      if (si == 0) {
        return -1;
      }
      s = summary_[--si];
    }
  }

  // The smallest member, or -1 when the set is empty.
  int64_t first() const {
    for (size_t si = 0; si < summary_.size(); ++si) {
      if (summary_[si] != 0) {
        const int64_t w = (static_cast<int64_t>(si) << 6) + __builtin_ctzll(summary_[si]);
        return (w << 6) + __builtin_ctzll(words_[w]);
      }
    }
    return -1;
  }

 private:
  static uint64_t bit(int64_t b) { return uint64_t{1} << b; }
  static uint64_t up_to(int64_t b) { return b == 63 ? ~uint64_t{0} : (uint64_t{1} << (b + 1)) - 1; }  // bits 0..b
  static uint64_t below(int64_t b) { return (uint64_t{1} << b) - 1; }                                   // bits 0..b-1
  static int64_t highest(uint64_t w) { return 63 - __builtin_clzll(w); }

  std::vector<uint64_t> words_;    // bit v: some unused document has length v
  std::vector<uint64_t> summary_;  // bit i: words_[i] != 0
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> best_fit_pack_cpu(
    const at::Tensor& tokens_in, const at::Tensor& offsets_in, int64_t num_rows, int64_t row_len) {
  TORCH_CHECK(tokens_in.device().is_cpu() && offsets_in.device().is_cpu(),
              "best_fit_pack: tokens and offsets must be CPU tensors");
  TORCH_CHECK(tokens_in.scalar_type() == at::kInt && tokens_in.dim() == 1,
              "best_fit_pack: tokens must be a 1-D int32 tensor, got ", tokens_in.scalar_type(), " ",
              tokens_in.sizes());
  TORCH_CHECK(offsets_in.scalar_type() == at::kLong && offsets_in.dim() == 1 && offsets_in.numel() >= 1,
              "best_fit_pack: offsets must be a 1-D int64 tensor of D+1 entries, got ", offsets_in.scalar_type(),
              " ", offsets_in.sizes());
  TORCH_CHECK(num_rows >= 0 && row_len >= 1, "best_fit_pack: need num_rows >= 0 and row_len >= 1, got ", num_rows,
              ", ", row_len);
  const at::Tensor tokens = tokens_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int32_t* tok = tokens.const_data_ptr<int32_t>();
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const int64_t num_docs = offsets.numel() - 1;
  const int64_t num_tokens = tokens.numel();
  TORCH_CHECK(off[0] >= 0, "best_fit_pack: offsets[0] must be >= 0, got ", off[0]);
  for (int64_t i = 0; i < num_docs; ++i) {
    TORCH_CHECK(off[i + 1] >= off[i], "best_fit_pack: offsets must be non-decreasing, but offsets[", i + 1,
                "] = ", off[i + 1], " < offsets[", i, "] = ", off[i]);
  }
  TORCH_CHECK(off[num_docs] <= num_tokens, "best_fit_pack: offsets[-1] = ", off[num_docs],
              " points past the end of tokens (", num_tokens, " tokens)");

  // Queues of unused documents: per length <= row_len (ascending index), then the longer ones.
  std::vector<int64_t> head(row_len + 2, 0);  // head[L]..head[L+1]: after the prefix sum, bucket L's slice
  std::vector<int64_t> longer;
  for (int64_t i = 0; i < num_docs; ++i) {
    const int64_t n = off[i + 1] - off[i];
    if (n <= row_len) {
      ++head[n + 1];
    } else {
      longer.push_back(i);
    }
  }
  for (int64_t L = 0; L <= row_len; ++L) {
    head[L + 1] += head[L];
  }
  std::vector<int64_t> end(head.begin() + 1, head.end());  // end[L]: one past bucket L
  std::vector<int64_t> fill(head.begin(), head.end() - 1);
  std::vector<int64_t> order(head[row_len + 1]);
  for (int64_t i = 0; i < num_docs; ++i) {
    const int64_t n = off[i + 1] - off[i];
    if (n <= row_len) {
      order[fill[n]++] = i;
    }
  }
  std::stable_sort(longer.begin(), longer.end(),
                   [off](int64_t a, int64_t b) { return off[a + 1] - off[a] < off[b + 1] - off[b]; });
  size_t longer_head = 0;
  LengthSet fits(row_len + 1);
  for (int64_t L = 0; L <= row_len; ++L) {
    if (head[L] < end[L]) {
      fits.insert(L);
    }
  }
  auto pop = [&](int64_t L) {
    const int64_t doc = order[head[L]++];
    if (head[L] == end[L]) {
      fits.erase(L);
    }
    return doc;
  };

  // Each completed row uses up documents holding at least row_len tokens, so no more rows than this can come.
  const int64_t capacity = std::min(num_rows, (off[num_docs] - off[0]) / row_len);
  at::Tensor rows = at::empty({capacity, row_len}, tokens.options());
  at::Tensor consumed = at::empty({num_docs}, offsets.options().dtype(at::kBool));
  at::Tensor cropped = at::empty({}, offsets.options());
  int32_t* out = rows.mutable_data_ptr<int32_t>();
  bool* used_flag = consumed.mutable_data_ptr<bool>();
  std::fill(used_flag, used_flag + num_docs, false);

  int64_t total_crop = 0;
  int64_t done = 0;
  std::vector<int64_t> in_row;
  // Past `capacity` (when it is below num_rows) fewer than row_len tokens are left, so the reference would
  // abandon the next row, which changes nothing it returns: stop there.
  for (; done < capacity; ++done) {
    int32_t* row = out + done * row_len;
    int64_t pos = 0;
    int64_t row_crop = 0;
    in_row.clear();
    bool abandoned = false;
    while (pos < row_len) {
      const int64_t space = row_len - pos;
      int64_t doc;
      const int64_t best = fits.prev(space);
      if (best >= 0) {
        doc = pop(best);  // the longest that fits, lowest index among equals
      } else {
        const int64_t shortest = fits.first();  // nothing fits: every unused document is longer than space
        if (shortest >= 0) {
          doc = pop(shortest);
        } else if (longer_head < longer.size()) {
          doc = longer[longer_head++];
        } else {
          abandoned = true;
          break;
        }
      }
      const int64_t n = off[doc + 1] - off[doc];
      const int64_t take = std::min(n, space);
      std::memcpy(row + pos, tok + off[doc], static_cast<size_t>(take) * sizeof(int32_t));
      row_crop += n - take;
      used_flag[doc] = true;
      in_row.push_back(doc);
      pos += take;
    }
    if (abandoned) {  // its documents stay unused; the queues are not needed any more
      for (const int64_t doc : in_row) {
        used_flag[doc] = false;
      }
      break;
    }
    total_crop += row_crop;
  }
  *cropped.mutable_data_ptr<int64_t>() = total_crop;
  return {rows.narrow(0, 0, done), consumed, cropped};
}

}  // namespace

TORCH_LIBRARY_IMPL(nanotrain, CPU, m) {
  m.impl("best_fit_pack", &best_fit_pack_cpu);
}

}  // namespace nanotrain
