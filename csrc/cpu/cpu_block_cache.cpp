// A cache of large CPU blocks keyed by exact size, installed as c10's CPU allocator while a
// training run is on. glibc serves 64 KiB-8 MiB blocks from its heap and returns freed memory
// to the system only from the heap's top, so activations and gradients freed in another order
// than they were taken leave resident holes in the run's peak memory (docs/memory.md). A
// training step asks for the same sizes every micro-batch; here a freed block of
// n bytes waits for the next request of exactly n bytes, so what is held is, per size, the most
// blocks of that size alive at once. Smaller blocks are allocated and freed as c10's default
// allocator does.
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace ryzen_llm {
namespace {

class CpuBlockCache final : public c10::Allocator {
 public:
  // Leaked on purpose: tensors freed during interpreter shutdown still call free_block.
  static CpuBlockCache& instance() {
    static auto* cache = new CpuBlockCache();
    return *cache;
  }

  bool enable(int64_t min_bytes) {
    TORCH_CHECK(min_bytes >= 1, "cpu_block_cache_enable: min_bytes must be >= 1, got ", min_bytes);
    std::lock_guard<std::mutex> lock(mu_);
    c10::Allocator* current = c10::GetCPUAllocator();
    if (current != this) previous_ = current;
    min_bytes_ = static_cast<size_t>(min_bytes);
    c10::SetCPUAllocator(this, /*priority=*/0);
    enabled_ = c10::GetCPUAllocator() == this;  // another allocator of higher priority wins
    peak_held_bytes_ = in_use_bytes_ + cached_bytes_;  // stats()[2] and [3] count from here
    peak_in_use_bytes_ = in_use_bytes_;
    return enabled_;
  }

  int64_t disable() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (enabled_ && c10::GetCPUAllocator() == this) c10::SetCPUAllocator(previous_, 0);
      enabled_ = false;
    }
    return release();
  }

  // Frees every cached block; returns the bytes freed.
  int64_t release() {
    std::vector<void*> blocks;
    size_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [size, list] : free_) {
        bytes += size * list.size();
        blocks.insert(blocks.end(), list.begin(), list.end());
      }
      free_.clear();
      cached_bytes_ = 0;
    }
    for (void* p : blocks) c10::free_cpu(p);
    return static_cast<int64_t>(bytes);
  }

  // [bytes cached (free, held), bytes in use (handed out and alive), most held at once (both)
  // since the last enable, most in use at once since the last enable]; the last two differ by
  // the cached blocks no request of their size could take at the peak
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(cached_bytes_), static_cast<int64_t>(in_use_bytes_),
            static_cast<int64_t>(peak_held_bytes_), static_cast<int64_t>(peak_in_use_bytes_)};
  }

  // Every block, small or large, comes from c10::alloc_cpu with context == data pointer and one
  // deleter: ATen's raw_allocate/raw_deallocate (oneDNN's scratch memory) need that.
  c10::DataPtr allocate(size_t n) override {
    void* p = nullptr;
    const bool large = n >= min_bytes_.load(std::memory_order_relaxed);
    if (large) {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(n);
      if (it != free_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        cached_bytes_ -= n;
      }
    }
    if (p == nullptr) p = c10::alloc_cpu(n);  // 64-byte aligned, like c10's default allocator
    if (large && p != nullptr) {
      std::lock_guard<std::mutex> lock(mu_);
      sizes_.emplace(p, n);
      in_use_bytes_ += n;
      peak_held_bytes_ = std::max(peak_held_bytes_, in_use_bytes_ + cached_bytes_);
      peak_in_use_bytes_ = std::max(peak_in_use_bytes_, in_use_bytes_);
    }
    return {p, p, &CpuBlockCache::free_block, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &CpuBlockCache::free_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  CpuBlockCache() : previous_(c10::GetCPUAllocator()) {}

  static void free_block(void* p) {
    CpuBlockCache& cache = instance();
    bool keep = false;
    {
      std::lock_guard<std::mutex> lock(cache.mu_);
      auto it = cache.sizes_.find(p);
      if (it != cache.sizes_.end()) {
        const size_t n = it->second;
        cache.sizes_.erase(it);
        cache.in_use_bytes_ -= n;
        keep = cache.enabled_;
        if (keep) {
          cache.free_[n].push_back(p);
          cache.cached_bytes_ += n;
        }
      }
    }
    if (!keep) c10::free_cpu(p);
  }

  std::mutex mu_;
  c10::Allocator* previous_;
  std::atomic<size_t> min_bytes_{SIZE_MAX};
  bool enabled_ = false;
  std::unordered_map<void*, size_t> sizes_;  // large blocks handed out -> their size
  std::unordered_map<size_t, std::vector<void*>> free_;  // size -> cached blocks
  size_t cached_bytes_ = 0;
  size_t in_use_bytes_ = 0;
  size_t peak_held_bytes_ = 0;
  size_t peak_in_use_bytes_ = 0;
};

bool cpu_block_cache_enable(int64_t min_bytes) {
  return CpuBlockCache::instance().enable(min_bytes);
}

int64_t cpu_block_cache_disable() { return CpuBlockCache::instance().disable(); }

std::vector<int64_t> cpu_block_cache_stats() { return CpuBlockCache::instance().stats(); }

}  // namespace

// No tensor arguments: the kernels are registered for every dispatch key.
TORCH_LIBRARY_IMPL(ryzen_llm, CompositeExplicitAutograd, m) {
  m.impl("cpu_block_cache_enable", TORCH_FN(cpu_block_cache_enable));
  m.impl("cpu_block_cache_disable", TORCH_FN(cpu_block_cache_disable));
  m.impl("cpu_block_cache_stats", TORCH_FN(cpu_block_cache_stats));
}

}  // namespace ryzen_llm
