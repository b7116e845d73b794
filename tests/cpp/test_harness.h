// A minimal test harness for the kernel tests: TEST_CASE registers a function, EXPECT records a
// failure with its location, main() runs every case and ends with "N passed, M failed".
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace harness {

struct Case {
  const char* name;
  std::function<void()> fn;
};

inline std::vector<Case>& cases() {
  static std::vector<Case> all;
  return all;
}

inline int& failures() {
  static int n = 0;
  return n;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { cases().push_back({name, fn}); }
};

// Max |a - b| over all elements, both converted to double.
inline double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0) return 0.0;
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

template <typename Fn>
at::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

}  // namespace harness

#define RL_CONCAT_(a, b) a##b
#define RL_CONCAT(a, b) RL_CONCAT_(a, b)
#define TEST_CASE(name)                                                          \
  static void name();                                                            \
  static harness::Register RL_CONCAT(register_, name)(#name, name);              \
  static void name()

#define EXPECT(cond, ...)                                                         \
  do {                                                                           \
    if (!(cond)) {                                                               \
      ++harness::failures();                                                     \
      std::fprintf(stderr, "  EXPECT failed at %s:%d: %s ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                         \
      std::fprintf(stderr, "\n");                                                \
    }                                                                            \
  } while (0)

#define EXPECT_THROWS(stmt, expected_text)                                                 \
  do {                                                                           \
    bool thrown_ = false;                                                        \
    try {                                                                        \
      stmt;                                                                      \
    } catch (const c10::Error& e) {                                              \
      thrown_ = std::string(e.what()).find(expected_text) != std::string::npos;           \
      if (!thrown_) std::fprintf(stderr, "  wrong message: %s\n", e.what());     \
    }                                                                            \
    EXPECT(thrown_, "expected a c10::Error containing '%s'", expected_text);               \
  } while (0)
