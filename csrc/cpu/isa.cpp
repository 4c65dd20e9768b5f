// Run-time choice of the instruction set for the CPU kernels.
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>

#include "fusedformer/cpu/kernels.h"

namespace fusedformer::cpu {

FF_DECLARE_KERNELS(generic)
#ifdef FF_HAVE_ISA_avx2
FF_DECLARE_KERNELS(avx2)
#endif
#ifdef FF_HAVE_ISA_avx512
FF_DECLARE_KERNELS(avx512)
#endif

namespace {

#define FF_TABLE(ns) \
  KernelTable { #ns, ns::softmax_fwd, ns::softmax_bwd, ns::norm_fwd, ns::norm_bwd, ns::attention_fwd, ns::attention_bwd, ns::linear_fwd, ns::gemm, \
             ns::cross_entropy, ns::gelu_fwd, ns::gelu_bwd, \
             ns::paged_attention, ns::quantized_linear }

const KernelTable kGeneric = FF_TABLE(generic);
#ifdef FF_HAVE_ISA_avx2
const KernelTable kAvx2 = FF_TABLE(avx2);
#endif
#ifdef FF_HAVE_ISA_avx512
const KernelTable kAvx512 = FF_TABLE(avx512);
#endif

struct Isas {
  const KernelTable* tables[3];
  const char* names[3];
  int count = 0;
  Isas() {
    add(&kGeneric);
#if defined(FF_HAVE_ISA_avx2) && (defined(__x86_64__) || defined(_M_X64))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      add(&kAvx2);
#endif
#if defined(FF_HAVE_ISA_avx512) && (defined(__x86_64__) || defined(_M_X64))
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      add(&kAvx512);
#endif
  }
  void add(const KernelTable* t) {
    tables[count] = t;
    names[count] = t->name;
    ++count;
  }
  const KernelTable* find(const char* name) const {
    for (int i = 0; i < count; ++i)
      if (std::strcmp(names[i], name) == 0) return tables[i];
    return nullptr;
  }
};

const Isas& isas() {
  static const Isas s;
  return s;
}

const KernelTable* initial() {
  const Isas& s = isas();
  if (const char* env = std::getenv("FUSEDFORMER_CPU_CAPABILITY")) {
    std::string want(env);
    for (auto& c : want) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    // the best available at or below the request (an unknown name keeps the best)
    int idx = -1;
    for (int i = 0; i < s.count; ++i)
      if (want == s.names[i]) idx = i;
    if (want == "avx512" && idx < 0) idx = s.count - 1;
    if (idx >= 0) return s.tables[idx];
  }
  return s.tables[s.count - 1];
}

std::atomic<const KernelTable*> g_table{nullptr};

}  // namespace

const KernelTable& kernels() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (!t) {
    t = initial();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

const char* const* available_isas(int* count) {
  *count = isas().count;
  return isas().names;
}

bool set_isa(const char* name) {
  const KernelTable* t = isas().find(name);
  if (!t) return false;
  g_table.store(t, std::memory_order_release);
  return true;
}

}  // namespace fusedformer::cpu
