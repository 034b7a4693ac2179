// Private to core: a small owning host tensor that lends itself as a DLTensor.
// Ownership: owns its data; dl() returns a view valid until the tensor is resized or destroyed.
// Thread-safety: none.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include <dlpack/dlpack.h>

namespace loom::detail {

template <class T> constexpr DLDataType dtype_of();
template <> constexpr DLDataType dtype_of<float>() { return {kDLFloat, 32, 1}; }
template <> constexpr DLDataType dtype_of<int32_t>() { return {kDLInt, 32, 1}; }
template <> constexpr DLDataType dtype_of<uint8_t>() { return {kDLUInt, 8, 1}; }

template <> constexpr DLDataType dtype_of<double>() { return {kDLFloat, 64, 1}; }
template <> constexpr DLDataType dtype_of<int64_t>() { return {kDLInt, 64, 1}; }

// A one-dimensional view of `count` values of T at `data` on `device` (a collective's buffer);
// `count` must outlive the view (its shape points at it).
template <class T> DLTensor flat_view(T *data, int64_t &count, DLDevice device = {kDLCPU, 0}) {
  DLTensor t{};
  t.data = const_cast<std::remove_const_t<T> *>(data);
  t.device = device;
  t.ndim = 1;
  t.dtype = dtype_of<std::remove_const_t<T>>();
  t.shape = &count;
  return t;
}

// A DLTensor over host memory owned elsewhere (up to four dimensions), valid while both live.
// Not copyable: the tensor points at the view's own shape.
struct View {
  DLTensor t{};
  int64_t shape[4]{};
  View(const void *data, DLDataType dtype, std::initializer_list<int64_t> dims) {
    t.data = const_cast<void *>(data);
    t.device = {kDLCPU, 0};
    t.ndim = static_cast<int32_t>(dims.size());
    t.dtype = dtype;
    std::copy(dims.begin(), dims.end(), shape);
    t.shape = shape;
    t.strides = nullptr;
    t.byte_offset = 0;
  }
  View(const View &) = delete;
  View &operator=(const View &) = delete;
  DLTensor *dl() { return &t; }
};

template <class T> class HostTensor {
 public:
  HostTensor() = default;
  explicit HostTensor(std::vector<int64_t> shape) : shape_(std::move(shape)) {
    int64_t n = 1;
    for (int64_t d : shape_) n *= d;
    data_.assign(static_cast<size_t>(n), T{});
  }
  T *data() { return data_.data(); }
  const T *data() const { return data_.data(); }
  size_t numel() const { return data_.size(); }
  std::vector<T> &values() { return data_; }
  int64_t dim(size_t i) const { return shape_[i]; }
  DLTensor *dl() {
    dl_.data = data_.data();
    dl_.device = {kDLCPU, 0};
    dl_.ndim = static_cast<int32_t>(shape_.size());
    dl_.dtype = dtype_of<T>();
    dl_.shape = shape_.data();
    dl_.strides = nullptr;
    dl_.byte_offset = 0;
    return &dl_;
  }

 private:
  std::vector<int64_t> shape_;
  std::vector<T> data_;
  DLTensor dl_{};
};

} // namespace loom::detail
