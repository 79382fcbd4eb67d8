// qwenkit's MinHash signature kernel (qwenkit.data.minhash_kernel builds it on first use with
// torch.utils.cpp_extension and caches it): for a batch of documents, everything `steps.minhash_signatures`
// does after NFKC + case folding, in one call with the GIL released:
//
//   1. words: each character's class comes from a table the loader derives from the very `regex` patterns
//      of `steps.match_words` (0 = separator, 1 = CJK character, a word alone, 2 = letter/mark/digit that
//      forms runs), so the words are the regex's words by construction;
//   2. each word's 64-bit XXH3 (seed 0) of its UTF-8 bytes, as `xxhash.xxh3_64_intdigest(word)`; the
//      header is the official xxHash that pyarrow (a qwenkit dependency) ships, compiled inline;
//   3. shingles: h = h_i * 0x9E3779B97F4A7C15 + h_{i+1} ... over n consecutive words (a document of fewer
//      than n words is one shingle of all of them), wrapping mod 2^64;
//   4. datatrove's permutations: min over shingles of ((s * a_j + b_j) mod 2^64) mod (2^61 - 1), masked to
//      32 bits for precision 32; a document with no words keeps the row the caller filled (all ones).
//
// Only pybind11 (shipped in torch's include directory) is used, not torch/extension.h: it builds in seconds.

#include <Python.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#define XXH_INLINE_ALL
#include "arrow/vendored/xxhash/xxhash.h"

namespace py = pybind11;

namespace {

constexpr uint64_t kMersenne = (uint64_t{1} << 61) - 1;
constexpr uint64_t kShingleMix = 0x9E3779B97F4A7C15ULL;
constexpr uint32_t kCodePoints = 0x110000;

// A str's code points as CPython stores them (1, 2 or 4 bytes each); valid while the str lives.
struct Text {
  const void* data;
  Py_ssize_t length;
  int kind;
};

Text text_of(PyObject* object) {
  if (!PyUnicode_Check(object)) throw py::type_error("minhash kernel: every text must be a str");
  if (PyUnicode_READY(object) != 0) throw py::error_already_set();
  return {PyUnicode_DATA(object), PyUnicode_GET_LENGTH(object), static_cast<int>(PyUnicode_KIND(object))};
}

size_t utf8_encode(uint32_t c, char* out) {
  if (c < 0x80) {
    out[0] = static_cast<char>(c);
    return 1;
  }
  if (c < 0x800) {
    out[0] = static_cast<char>(0xC0 | (c >> 6));
    out[1] = static_cast<char>(0x80 | (c & 0x3F));
    return 2;
  }
  if (c < 0x10000) {
    out[0] = static_cast<char>(0xE0 | (c >> 12));
    out[1] = static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out[2] = static_cast<char>(0x80 | (c & 0x3F));
    return 3;
  }
  out[0] = static_cast<char>(0xF0 | (c >> 18));
  out[1] = static_cast<char>(0x80 | ((c >> 12) & 0x3F));
  out[2] = static_cast<char>(0x80 | ((c >> 6) & 0x3F));
  out[3] = static_cast<char>(0x80 | (c & 0x3F));
  return 4;
}

// Calls word(begin, end) for each word [begin, end) of `text` (code point indices).
template <typename Char, typename Word>
void for_each_word(const Char* data, Py_ssize_t length, const uint8_t* table, Word&& word) {
  auto kind_of = [table](uint32_t c) -> uint8_t { return c < kCodePoints ? table[c] : 0; };
  Py_ssize_t i = 0;
  while (i < length) {
    const uint8_t kind = kind_of(data[i]);
    if (kind == 0) {
      ++i;
    } else if (kind == 1) {
      word(i, i + 1);
      ++i;
    } else {
      Py_ssize_t j = i + 1;
      while (j < length && kind_of(data[j]) == 2) ++j;
      word(i, j);
      i = j;
    }
  }
}

// The XXH3 of each word of `text`, appended to `hashes`; `buffer` holds a word's UTF-8 bytes.
template <typename Char>
void word_hashes_of(const Char* data, Py_ssize_t length, const uint8_t* table, std::vector<uint64_t>& hashes,
                    std::vector<char>& buffer) {
  for_each_word(data, length, table, [&](Py_ssize_t begin, Py_ssize_t end) {
    if (sizeof(Char) == 1) {
      bool ascii = true;
      for (Py_ssize_t k = begin; k < end; ++k) ascii &= data[k] < 0x80;
      if (ascii) {  // a 1-byte str's ASCII code points are already UTF-8
        hashes.push_back(XXH3_64bits(reinterpret_cast<const char*>(data + begin), end - begin));
        return;
      }
    }
    buffer.resize(4 * static_cast<size_t>(end - begin));
    size_t size = 0;
    for (Py_ssize_t k = begin; k < end; ++k) size += utf8_encode(data[k], buffer.data() + size);
    hashes.push_back(XXH3_64bits(buffer.data(), size));
  });
}

void word_hashes(const Text& text, const uint8_t* table, std::vector<uint64_t>& hashes, std::vector<char>& buffer) {
  hashes.clear();
  switch (text.kind) {
    case PyUnicode_1BYTE_KIND:
      word_hashes_of(static_cast<const uint8_t*>(text.data), text.length, table, hashes, buffer);
      break;
    case PyUnicode_2BYTE_KIND:
      word_hashes_of(static_cast<const uint16_t*>(text.data), text.length, table, hashes, buffer);
      break;
    default:
      word_hashes_of(static_cast<const uint32_t*>(text.data), text.length, table, hashes, buffer);
  }
}

// n-gram shingles of the word hashes, in place (the first `count` entries; returns count).
size_t shingles_in_place(std::vector<uint64_t>& hashes, size_t n) {
  const size_t words = hashes.size();
  if (words == 0) return 0;
  const size_t span = std::min(n, words);
  const size_t count = words - span + 1;
  for (size_t k = 0; k < count; ++k) {
    uint64_t value = hashes[k];
    for (size_t i = 1; i < span; ++i) value = value * kShingleMix + hashes[k + i];
    hashes[k] = value;  // hashes[k + i] for i >= 1 are still unread word hashes: k only moves forward
  }
  return count;
}

// row[j] = min over shingles of mod_mersenne(s * a[j] + b[j]) & mask. The loop over permutations is
// independent per j, so the compiler vectorizes it (an AVX2 clone where the CPU has it). After the
// reduction every value is below 2^62, so signed compares (which AVX2 has for 64 bits) order them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void permute_min(const uint64_t* shingles, size_t count, const uint64_t* __restrict a, const uint64_t* __restrict b,
                 size_t permutations, uint64_t mask, int64_t* __restrict row) {
  constexpr int64_t mersenne = static_cast<int64_t>(kMersenne);
  const int64_t keep = static_cast<int64_t>(mask & kMersenne);  // every value is below 2^61 - 1 anyway
  for (size_t j = 0; j < permutations; ++j) row[j] = mersenne;  // above every value
  for (size_t k = 0; k < count; ++k) {
    const uint64_t s = shingles[k];
    for (size_t j = 0; j < permutations; ++j) {
      const uint64_t product = s * a[j] + b[j];  // wraps mod 2^64, as datatrove's numpy uint64 does
      // 2^61 = 1 mod 2^61 - 1, so hi * 2^61 + lo = hi + lo, below 2 (2^61 - 1): one subtraction at most
      int64_t v = static_cast<int64_t>((product & kMersenne) + (product >> 61));
      v = v >= mersenne ? v - mersenne : v;
      v &= keep;
      row[j] = v < row[j] ? v : row[j];
    }
  }
}

struct Parameters {
  const uint8_t* table;
  const uint64_t* a;
  const uint64_t* b;
  size_t permutations;
  size_t n_grams;
  uint64_t mask;
};

void sign_range(const std::vector<Text>& texts, size_t begin, size_t end, const Parameters& p, uint64_t* out,
                uint8_t* has_words) {
  std::vector<uint64_t> hashes;
  std::vector<char> buffer;
  for (size_t d = begin; d < end; ++d) {
    word_hashes(texts[d], p.table, hashes, buffer);
    const size_t count = shingles_in_place(hashes, p.n_grams);
    has_words[d] = count > 0;
    if (count) permute_min(hashes.data(), count, p.a, p.b, p.permutations, p.mask,
                           reinterpret_cast<int64_t*>(out + d * p.permutations));
  }
}

const uint8_t* checked_table(const py::array_t<uint8_t, py::array::c_style>& table) {
  if (table.ndim() != 1 || table.shape(0) != kCodePoints)
    throw py::value_error("minhash kernel: the character table must have 0x110000 entries");
  return table.data();
}

std::vector<Text> texts_of(const py::list& texts) {
  std::vector<Text> out;
  out.reserve(texts.size());
  for (const py::handle& item : texts) out.push_back(text_of(item.ptr()));
  return out;
}

// Fills out[d] and has_words[d] for every text (out's rows of texts without words are left as they are).
void signatures(const py::list& texts, const py::array_t<uint8_t, py::array::c_style>& table,
                const py::array_t<uint64_t, py::array::c_style>& a, const py::array_t<uint64_t, py::array::c_style>& b,
                size_t n_grams, uint64_t mask, py::array_t<uint64_t, py::array::c_style>& out,
                py::array_t<uint8_t, py::array::c_style>& has_words, int threads) {
  const size_t permutations = static_cast<size_t>(a.size());
  const size_t documents = texts.size();
  if (b.size() != a.size()) throw py::value_error("minhash kernel: a and b differ in size");
  if (out.ndim() != 2 || static_cast<size_t>(out.shape(0)) != documents ||
      static_cast<size_t>(out.shape(1)) != permutations)
    throw py::value_error("minhash kernel: out must be [texts, permutations]");
  if (has_words.ndim() != 1 || static_cast<size_t>(has_words.shape(0)) != documents)
    throw py::value_error("minhash kernel: has_words must be [texts]");
  if (n_grams < 1) throw py::value_error("minhash kernel: n_grams must be at least 1");
  const Parameters p{checked_table(table), a.data(), b.data(), permutations, n_grams, mask};
  // the caller's list holds the strs alive during the call (qwenkit passes a list of its own)
  const std::vector<Text> items = texts_of(texts);
  uint64_t* rows = out.mutable_data();
  uint8_t* flags = has_words.mutable_data();
  const size_t workers = std::max<size_t>(1, std::min<size_t>(static_cast<size_t>(std::max(threads, 1)), documents));
  py::gil_scoped_release release;
  if (workers == 1) {
    sign_range(items, 0, documents, p, rows, flags);
    return;
  }
  // contiguous ranges of about equal characters per worker
  std::vector<size_t> bounds{0};
  size_t total = 0;
  for (const Text& t : items) total += static_cast<size_t>(t.length) + 1;
  size_t seen = 0;
  for (size_t d = 0; d < documents && bounds.size() < workers; ++d) {
    seen += static_cast<size_t>(items[d].length) + 1;
    if (seen * workers >= total * bounds.size()) bounds.push_back(d + 1);
  }
  while (bounds.size() <= workers) bounds.push_back(documents);
  bounds.back() = documents;
  std::vector<std::exception_ptr> errors(workers);  // an exception (bad_alloc) leaving a thread would abort
  auto work = [&](size_t w) {
    try {
      sign_range(items, bounds[w], bounds[w + 1], p, rows, flags);
    } catch (...) {
      errors[w] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  for (size_t w = 1; w < workers; ++w) pool.emplace_back(work, w);
  work(0);
  for (std::thread& thread : pool) thread.join();
  for (const std::exception_ptr& error : errors)
    if (error) std::rethrow_exception(error);
}

// The n-gram shingle hashes of one text, in order, duplicates kept (for tests and single documents).
py::array_t<uint64_t> shingles(const py::str& text, const py::array_t<uint8_t, py::array::c_style>& table,
                               size_t n_grams) {
  if (n_grams < 1) throw py::value_error("minhash kernel: n_grams must be at least 1");
  std::vector<uint64_t> hashes;
  std::vector<char> buffer;
  word_hashes(text_of(text.ptr()), checked_table(table), hashes, buffer);
  const size_t count = shingles_in_place(hashes, n_grams);
  py::array_t<uint64_t> out(static_cast<py::ssize_t>(count));
  std::copy(hashes.begin(), hashes.begin() + static_cast<std::ptrdiff_t>(count), out.mutable_data());
  return out;
}

// The words of one text as the kernel splits it (for tests).
py::list words(const py::str& text, const py::array_t<uint8_t, py::array::c_style>& table) {
  const Text t = text_of(text.ptr());
  const uint8_t* classes = checked_table(table);
  py::list out;
  auto add = [&](Py_ssize_t begin, Py_ssize_t end) {
    PyObject* word = PyUnicode_Substring(text.ptr(), begin, end);
    if (word == nullptr) throw py::error_already_set();
    out.append(py::reinterpret_steal<py::object>(word));
  };
  switch (t.kind) {
    case PyUnicode_1BYTE_KIND:
      for_each_word(static_cast<const uint8_t*>(t.data), t.length, classes, add);
      break;
    case PyUnicode_2BYTE_KIND:
      for_each_word(static_cast<const uint16_t*>(t.data), t.length, classes, add);
      break;
    default:
      for_each_word(static_cast<const uint32_t*>(t.data), t.length, classes, add);
  }
  return out;
}

uint64_t xxh3(const py::bytes& data) {
  char* pointer;
  Py_ssize_t size;
  if (PyBytes_AsStringAndSize(data.ptr(), &pointer, &size) != 0) throw py::error_already_set();
  return XXH3_64bits(pointer, static_cast<size_t>(size));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qwenkit's MinHash signature kernel (words, XXH3 shingles, datatrove's permutations)";
  m.def("signatures", &signatures, py::arg("texts"), py::arg("table"), py::arg("a"), py::arg("b"),
        py::arg("n_grams"), py::arg("mask"), py::arg("out").noconvert(), py::arg("has_words").noconvert(), py::arg("threads") = 1);
  m.def("shingles", &shingles, py::arg("text"), py::arg("table"), py::arg("n_grams"));
  m.def("words", &words, py::arg("text"), py::arg("table"));
  m.def("xxh3", &xxh3, py::arg("data"));
}
