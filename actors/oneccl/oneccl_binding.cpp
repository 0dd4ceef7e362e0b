// A small pybind11 binding over oneCCL's C++ API for CPU tensors. actors/oneccl/__init__.py builds
// it with torch.utils.cpp_extension and wraps it as OneCCLCommunicator (which also checks devices,
// dtypes and layout, so this file trusts its callers on those).
//
// Every collective blocks until done and releases the GIL while it waits, so Python threads (a
// watchdog, Ray's) keep running. With a timeout, the wait gives up with an error when a peer
// never arrives: oneCCL itself would wait forever.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <oneapi/ccl.hpp>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

std::once_flag init_once;

void ensure_init() {
    std::call_once(init_once, [] { ccl::init(); });
}

ccl::datatype to_ccl(const at::ScalarType t) {
    switch (t) {
        case at::kFloat: return ccl::datatype::float32;
        case at::kBFloat16: return ccl::datatype::bfloat16;
        case at::kHalf: return ccl::datatype::float16;
        case at::kDouble: return ccl::datatype::float64;
        case at::kLong: return ccl::datatype::int64;
        case at::kInt: return ccl::datatype::int32;
        case at::kShort: return ccl::datatype::int16;
        case at::kChar: return ccl::datatype::int8;
        case at::kByte: return ccl::datatype::uint8;
        default: TORCH_CHECK(false, "oneCCL: unsupported dtype ", t);
    }
}

// Main KVSes live as long as the process: the other ranks connect to one while they create
// their communicators, possibly after rank 0's Python side has dropped every reference to it.
std::vector<std::shared_ptr<ccl::kvs>> main_kvs_alive;

py::bytes create_main_kvs() {
    ensure_init();
    std::shared_ptr<ccl::kvs> kvs;
    {
        py::gil_scoped_release no_gil;
        kvs = ccl::create_main_kvs();
    }
    main_kvs_alive.push_back(kvs);
    const ccl::kvs::address_type address = kvs->get_address();
    return py::bytes(address.data(), address.size());
}

// What timed-out collectives may still touch (buffers, events, KVSes): never freed, not even
// by static destructors at exit.
auto& abandoned = *new std::vector<std::shared_ptr<void>>();

// Rank 0 joins through the main KVS it created; the other ranks connect to its address.
std::shared_ptr<ccl::kvs> kvs_for(const ccl::kvs::address_type& address) {
    for (const auto& kvs : main_kvs_alive) {
        if (kvs->get_address() == address) return kvs;
    }
    return ccl::create_kvs(address);
}

class Communicator {
public:
    Communicator(int rank, int world_size, const std::string& kvs_address, double timeout_s)
        : rank_(rank), world_size_(world_size), timeout_s_(timeout_s) {
        ccl::kvs::address_type address{};
        TORCH_CHECK(kvs_address.size() == address.size(), "oneCCL: a KVS address is ",
                    address.size(), " bytes, got ", kvs_address.size());
        std::memcpy(address.data(), kvs_address.data(), address.size());
        ensure_init();
        py::gil_scoped_release no_gil;  // blocks until every rank has joined
        kvs_ = kvs_for(address);
        comm_ = std::make_unique<ccl::communicator>(
            ccl::create_communicator(world_size, rank, kvs_));
    }

    void all_reduce(at::Tensor t) {
        auto& comm = get();
        py::gil_scoped_release no_gil;
        complete(ccl::allreduce(t.data_ptr(), t.data_ptr(), t.numel(), to_ccl(t.scalar_type()),
                                ccl::reduction::sum, comm),
                 "all_reduce", t);
    }

    void broadcast(at::Tensor t, int src) {
        auto& comm = get();
        py::gil_scoped_release no_gil;
        complete(ccl::broadcast(t.data_ptr(), t.numel(), to_ccl(t.scalar_type()), src, comm),
                 "broadcast", t, /*may_idle=*/true);
    }

    // Gathers every rank's `t` into a new [world_size, *t.shape] tensor.
    at::Tensor all_gather(const at::Tensor& t) {
        std::vector<int64_t> shape{world_size_};
        shape.insert(shape.end(), t.sizes().begin(), t.sizes().end());
        at::Tensor out = at::empty(shape, t.options());
        auto& comm = get();
        py::gil_scoped_release no_gil;
        complete(ccl::allgather(t.data_ptr(), out.data_ptr(), t.numel(), to_ccl(t.scalar_type()),
                                comm),
                 "all_gather", out);
        return out;
    }

    void barrier() {
        auto& comm = get();
        py::gil_scoped_release no_gil;
        complete(ccl::barrier(comm), "barrier", at::Tensor(), /*may_idle=*/true);
    }

    ~Communicator() { close(); }

    void close() {
        if (broken_) {
            // A timed-out operation may still write into its buffers, so neither they nor the
            // communicator it runs on may be freed: they stay until the process exits.
            comm_.release();
            abandoned.push_back(kvs_);
        }
        comm_.reset();
        kvs_.reset();
    }

private:
    ccl::communicator& get() {
        TORCH_CHECK(comm_, "oneCCL: the communicator is closed");
        TORCH_CHECK(!broken_,
                    "oneCCL: an earlier collective timed out, so this communicator is unusable");
        return *comm_;
    }

    // Drives `event` to completion from this thread (CCL_WORKER_OFFLOAD=0: there is no worker
    // thread). It polls flat out while the peers are likely close behind; a broadcast may be a
    // TP worker waiting for the next step, possibly for hours, so after kSpin it sleeps between
    // polls instead of burning a core, which delays that one wake-up by at most kMaxNap.
    void complete(ccl::event event, const char* op, const at::Tensor& buffer,
                  bool may_idle = false) {
        using clock = std::chrono::steady_clock;
        constexpr auto kSpin = std::chrono::milliseconds(2);
        constexpr auto kMaxNap = std::chrono::microseconds(500);
        const auto start = clock::now();
        auto nap = std::chrono::microseconds(10);
        while (!event.test()) {
            const auto now = clock::now();
            if (timeout_s_ > 0 && now - start > std::chrono::duration<double>(timeout_s_)) {
                broken_ = true;
                abandoned.push_back(std::make_shared<at::Tensor>(buffer));
                abandoned.push_back(std::make_shared<ccl::event>(std::move(event)));
                throw std::runtime_error(
                    std::string("oneCCL: ") + op + " on rank " + std::to_string(rank_) +
                    " timed out after " + std::to_string(timeout_s_) +
                    " s; a peer is gone or stuck");
            }
            if (may_idle && now - start > kSpin) {
                std::this_thread::sleep_for(nap);
                nap = std::min(nap * 2, kMaxNap);
            } else {
                std::this_thread::yield();
            }
        }
    }

    int rank_;
    int world_size_;
    double timeout_s_;  // <= 0: no limit
    std::shared_ptr<ccl::kvs> kvs_;
    std::unique_ptr<ccl::communicator> comm_;
    bool broken_ = false;  // a collective timed out
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("create_main_kvs", &create_main_kvs,
          "Create a main KVS in this process (rank 0) and return its address bytes.");
    py::class_<Communicator>(m, "Communicator")
        .def(py::init<int, int, const std::string&, double>(), py::arg("rank"),
             py::arg("world_size"), py::arg("kvs_address"), py::arg("timeout_s"))
        .def("all_reduce", &Communicator::all_reduce)
        .def("broadcast", &Communicator::broadcast)
        .def("all_gather", &Communicator::all_gather)
        .def("barrier", &Communicator::barrier)
        .def("close", &Communicator::close);
}
