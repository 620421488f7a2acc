// kvc's Python module (kvc._kvc, re-exported by python/kvc/__init__.py): the
// registry and dynamic_cache, with numpy arrays in and out.
//
// One translation unit on purpose: it includes kvc/registry.hpp, whose caches
// are instantiated once in kvc's library (src/registry.cpp), so this file
// compiles only the glue.
//
// Arrays. Keys and values are viewed where they lie (no copy) when their rows
// are contiguous along head_dim: C-contiguous arrays and slices of them along
// tokens or heads alike (kvc's layout_strided). Queries are read as one
// float32 block, so they must be C-contiguous float32. Anything else is a
// kvc.error naming the shape and dtype expected and those given: converting
// silently would hide a copy (or a precision change) in a hot loop.
//
// Threads. The GIL is released around the calls that do work (append,
// attend, attend_chunk, compress, fork). A cache holds a mutex for every call,
// so Python threads sharing one cache take turns instead of racing
// (compressed_cache allows concurrent calls on different layers only).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "kvc/calibration/artifact.hpp"
#include "kvc/calibration/cq.hpp"
#include "kvc/calibration/head_roles.hpp"
#include "kvc/calibration/kvquant.hpp"
#include "kvc/calibration/query_filters.hpp"
#include "kvc/core/error.hpp"
#include "kvc/registry.hpp"

namespace py = pybind11;

namespace {

using kvc::detail::require;

// "[3, 2, 64] float32": how an error names what it was given.
std::string described(const py::array& a) {
    std::ostringstream text;
    text << '[';
    for (py::ssize_t i = 0; i < a.ndim(); ++i) text << (i ? ", " : "") << a.shape(i);
    text << "] " << std::string(py::str(a.dtype()));
    return text.str();
}

std::string strides_of(const py::array& a) {
    std::ostringstream text;
    text << '(';
    for (py::ssize_t i = 0; i < a.ndim(); ++i) text << (i ? ", " : "") << a.strides(i);
    text << ')';
    return text.str();
}

bool native(const py::array& a) { return a.dtype().attr("isnative").cast<bool>(); }
bool is_f32(const py::array& a) { return a.dtype().kind() == 'f' && a.itemsize() == 4 && native(a); }
bool is_f16(const py::array& a) { return a.dtype().kind() == 'f' && a.itemsize() == 2 && native(a); }

// Anything the caller passed as an array: a numpy array as it is (no
// conversion, so no hidden copy); another object is refused by name.
py::array as_array(const py::handle& object, const char* who, const char* name) {
    if (!py::isinstance<py::array>(object))
        throw py::type_error(std::string(who) + ": expected " + name + " as a numpy array, got " +
                             std::string(py::str(py::type::handle_of(object).attr("__name__"))));
    return py::reinterpret_borrow<py::array>(object);
}

// Keys, values (or calibration samples): [tokens, heads, head_dim], float32
// (or float16 where `halves`), rows contiguous along head_dim, token and head
// strides whole elements >= 0: what kvc's layout_strided views in place.
void check_rows(const py::array& a, const char* who, const char* name, const char* heads_name, std::size_t heads,
                std::size_t dim, bool halves) {
    const char* dtypes = halves ? "float32 or float16" : "float32";
    require(a.ndim() == 3 && static_cast<std::size_t>(a.shape(1)) == heads &&
                static_cast<std::size_t>(a.shape(2)) == dim && (is_f32(a) || (halves && is_f16(a))),
            who, ": expected ", name, " of shape [tokens, ", heads, ", ", dim, "] (tokens, ", heads_name,
            ", head_dim) and dtype ", dtypes, ", got ", described(a));
    const py::ssize_t item = a.itemsize();
    const bool rows_contiguous = a.shape(2) <= 1 || a.strides(2) == item;
    const bool whole = a.strides(0) >= 0 && a.strides(1) >= 0 && a.strides(0) % item == 0 && a.strides(1) % item == 0;
    require(rows_contiguous && whole, who, ": expected ", name,
            " viewable in place: each [head_dim] row contiguous and non-negative token and head strides "
            "(a C-contiguous array, or a slice of one along tokens or heads), got ",
            described(a), " with byte strides ", strides_of(a), "; pass np.ascontiguousarray(", name, ")");
}

// The kv_view of an array check_rows accepted (no copy).
template <class T>
kvc::kv_view<const T, kvc::layout_strided> rows_of(const py::array& a) {
    const py::ssize_t item = a.itemsize();
    return kvc::kv_view<const T, kvc::layout_strided>(
        static_cast<const T*>(a.data()), static_cast<std::size_t>(a.shape(0)), static_cast<std::size_t>(a.shape(1)),
        static_cast<std::size_t>(a.shape(2)), static_cast<std::size_t>(a.strides(0) / item),
        static_cast<std::size_t>(a.strides(1) / item));
}

kvc::dtype storage_of(const std::string& name) {
    if (name == "f32" || name == "float32") return kvc::dtype::f32;
    if (name == "f16" || name == "float16") return kvc::dtype::f16;
    if (name == "bf16" || name == "bfloat16") return kvc::dtype::bf16;
    kvc::detail::fail("kvc.Cache: expected storage 'f32', 'f16' or 'bf16', got '", name, "'");
}

// calibration::artifact with its tensors as numpy arrays.
py::dict tensors_of(const kvc::calibration::artifact& a) {
    py::dict tensors;
    for (const kvc::calibration::tensor& t : a.tensors) {
        std::vector<py::ssize_t> shape(t.shape.begin(), t.shape.end());
        py::array_t<float> values(shape);
        std::copy(t.values.begin(), t.values.end(), values.mutable_data());
        tensors[py::str(t.name)] = std::move(values);
    }
    return tensors;
}

kvc::calibration::artifact artifact_from(std::string kind, const py::dict& tensors) {
    kvc::calibration::artifact a;
    a.kind = std::move(kind);
    for (const auto& [key, value] : tensors) {
        const std::string name = py::str(key);
        const py::array array = as_array(value, "kvc.Artifact", "each tensor");
        require(is_f32(array) && (array.flags() & py::array::c_style), "kvc.Artifact: expected tensor '", name,
                "' as a C-contiguous float32 array, got ", described(array));
        kvc::calibration::tensor t{name, {}, {}};
        for (py::ssize_t i = 0; i < array.ndim(); ++i) t.shape.push_back(static_cast<std::uint64_t>(array.shape(i)));
        const auto* data = static_cast<const float*>(array.data());
        t.values.assign(data, data + array.size());
        a.tensors.push_back(std::move(t));
    }
    return a;
}

// A dynamic_cache and what Python asks of it.
class cache {
public:
    cache(std::string spec, std::size_t layers, std::size_t kv_heads, std::size_t query_heads, std::size_t head_dim,
          const std::string& storage, float scale, std::size_t evict_every, const py::object& artifacts,
          const kvc::rope_config& rope)
        : spec_(std::move(spec)), cache_(build(spec_, layers, kv_heads, query_heads, head_dim, storage, scale,
                                               evict_every, artifacts, rope)) {}

    cache(const cache& other) : spec_(other.spec_), cache_(other.copy()) {}
    // pybind11 moves a returned cache into its holder: no second copy (the mutex is per object).
    cache(cache&& other) noexcept : spec_(std::move(other.spec_)), cache_(std::move(other.cache_)) {}

    const std::string& spec() const noexcept { return spec_; }
    const kvc::cache_config& config() const { return cache_.config(); }

    void append(std::size_t layer, const py::handle& keys_object, const py::handle& values_object,
                std::int64_t first_position) {
        const char* who = "kvc.Cache.append";
        const py::array keys = as_array(keys_object, who, "keys");
        const py::array values = as_array(values_object, who, "values");
        const kvc::cache_config& c = config();
        check_rows(keys, who, "keys", "kv_heads", c.kv_heads, c.head_dim, true);
        check_rows(values, who, "values", "kv_heads", c.kv_heads, c.head_dim, true);
        require(keys.shape(0) == values.shape(0) && is_f32(keys) == is_f32(values),
                who, ": expected keys and values of the same shape and dtype, got keys ", described(keys),
                " and values ", described(values));
        if (is_f32(keys)) append_rows<float>(layer, keys, values, first_position);
        else append_rows<kvc::half>(layer, keys, values, first_position);
    }

    py::object attend(std::size_t layer, const py::handle& queries_object, bool with_mass) {
        const kvc::cache_config& c = config();
        const py::array queries = as_array(queries_object, "kvc.Cache.attend", "queries");
        check_queries(queries, "kvc.Cache.attend", {c.query_heads, c.head_dim}, "[query_heads, head_dim]");
        return attended(layer, queries, 0, with_mass);
    }

    py::object attend_chunk(std::size_t layer, const py::handle& queries_object, bool with_mass) {
        const kvc::cache_config& c = config();
        const py::array queries = as_array(queries_object, "kvc.Cache.attend_chunk", "queries");
        require(queries.ndim() == 3, "kvc.Cache.attend_chunk: expected queries of shape [chunk, ", c.query_heads,
                ", ", c.head_dim, "] float32, got ", described(queries));
        const auto chunk = static_cast<std::size_t>(queries.shape(0));
        check_queries(queries, "kvc.Cache.attend_chunk", {chunk, c.query_heads, c.head_dim},
                      "[chunk, query_heads, head_dim]");
        return attended(layer, queries, chunk, with_mass);
    }

    void compress(std::optional<std::size_t> layer) {
        py::gil_scoped_release unlocked;
        std::lock_guard<std::mutex> hold(lock_);
        if (layer) cache_.compress(*layer);
        else cache_.compress();
    }

    std::size_t tokens(std::size_t layer, std::optional<std::size_t> head) const {
        std::lock_guard<std::mutex> hold(lock_);
        return head ? cache_.tokens(layer, *head) : cache_.tokens(layer);
    }
    std::size_t tokens_seen(std::size_t layer) const {
        std::lock_guard<std::mutex> hold(lock_);
        return cache_.tokens_seen(layer);
    }
    std::int64_t next_position(std::size_t layer) const {
        std::lock_guard<std::mutex> hold(lock_);
        return cache_.next_position(layer);
    }
    std::size_t bytes() const {
        std::lock_guard<std::mutex> hold(lock_);
        return cache_.bytes();
    }
    std::size_t stored_bytes(std::size_t layer) const {
        std::lock_guard<std::mutex> hold(lock_);
        return cache_.stored_bytes(layer);
    }

    // Copies: the cache's own memory moves when it appends or compresses.
    py::array_t<std::int32_t> positions(std::size_t layer, std::size_t head) const {
        std::lock_guard<std::mutex> hold(lock_);
        const std::size_t n = cache_.tokens(layer, head);
        py::array_t<std::int32_t> out(static_cast<py::ssize_t>(n));
        const std::int32_t* p = cache_.positions(layer, head);
        if (n) std::copy(p, p + n, out.mutable_data());
        return out;
    }
    py::object attention_statistic(std::size_t layer, std::size_t head) const {
        std::lock_guard<std::mutex> hold(lock_);
        const std::size_t n = cache_.tokens(layer, head);
        const float* s = cache_.attention_statistic(layer, head);
        if (s == nullptr) return py::none();
        py::array_t<float> out(static_cast<py::ssize_t>(n));
        std::copy(s, s + n, out.mutable_data());
        return std::move(out);
    }
    // E18: the engine's own scores, one per held token in positions() order.
    void set_external_scores(std::size_t layer, std::size_t head, const py::handle& scores_object) {
        const py::array scores = as_array(scores_object, "kvc.Cache.set_external_scores", "scores");
        std::lock_guard<std::mutex> hold(lock_);
        const std::size_t n = cache_.tokens(layer, head);
        require(is_f32(scores) && scores.ndim() == 1 && static_cast<std::size_t>(scores.shape(0)) == n &&
                    (scores.flags() & py::array::c_style),
                "kvc.Cache.set_external_scores: expected scores of shape [", n,
                "] float32 (C-contiguous; one per token the head holds), got ", described(scores));
        float* into = cache_.external_scores(layer, head);
        require(into != nullptr, "kvc.Cache.set_external_scores: expected a cache whose eviction is 'external', got ",
                spec_);
        const auto* from = static_cast<const float*>(scores.data());
        std::copy(from, from + n, into);
    }

    void clear() {
        std::lock_guard<std::mutex> hold(lock_);
        cache_.clear();
    }

    cache fork() const {
        py::gil_scoped_release unlocked;
        return cache(*this);
    }

    // docs/SERIALIZATION.md's bytes: the whole cache, or one layer.
    py::bytes save(std::optional<std::size_t> layer) const {
        std::vector<unsigned char> out;
        {
            py::gil_scoped_release unlocked;
            std::lock_guard<std::mutex> hold(lock_);
            out = layer ? kvc::save_layer(cache_, *layer) : kvc::save_cache(cache_);
        }
        return py::bytes(reinterpret_cast<const char*>(out.data()), out.size());
    }
    // Takes any contiguous buffer of bytes (bytes, bytearray, memoryview,
    // a uint8 array). The GIL stays held: a bytearray cannot change under the load.
    void load(const py::buffer& data, std::optional<std::size_t> layer) {
        const py::buffer_info info = data.request();
        const bool contiguous = info.ndim == 1 && (info.shape[0] <= 1 || info.strides[0] == info.itemsize);
        require(info.itemsize == 1 && contiguous,
                "kvc.Cache.load: expected the bytes of save() (bytes, bytearray or a contiguous uint8 buffer), got a "
                "buffer of ", info.ndim, " dimensions and ", info.itemsize, "-byte items");
        const auto size = static_cast<std::size_t>(info.shape[0]);
        std::lock_guard<std::mutex> hold(lock_);
        if (layer) kvc::load_layer(cache_, *layer, info.ptr, size);
        else kvc::load_cache(cache_, info.ptr, size);
    }

private:
    static kvc::dynamic_cache build(const std::string& spec, std::size_t layers, std::size_t kv_heads,
                                    std::size_t query_heads, std::size_t head_dim, const std::string& storage,
                                    float scale, std::size_t evict_every, const py::object& artifacts,
                                    const kvc::rope_config& rope) {
        kvc::cache_config config;
        config.layers = layers;
        config.kv_heads = kv_heads;
        config.query_heads = query_heads;
        config.head_dim = head_dim;
        config.storage = storage_of(storage);
        config.scale = scale;
        kvc::cache_options options;
        options.evict_every = evict_every;
        options.rope = rope;
        if (!artifacts.is_none()) {
            require(py::isinstance<py::dict>(artifacts),
                    "kvc.Cache: expected artifacts as a dict {method name: kvc.Artifact or path}, got ",
                    std::string(py::str(py::type::handle_of(artifacts).attr("__name__"))));
            for (const auto& [key, value] : artifacts.cast<py::dict>()) {
                const std::string name = py::str(key);
                if (py::isinstance<py::str>(value) || py::hasattr(value, "__fspath__"))
                    options.artifacts[name] =
                        kvc::calibration::load(py::str(py::module_::import("os").attr("fspath")(value)));
                else
                    options.artifacts[name] = value.cast<kvc::calibration::artifact>();
            }
        }
        return kvc::make_cache(config, spec, options);
    }

    kvc::dynamic_cache copy() const {
        std::lock_guard<std::mutex> hold(lock_);
        return cache_;
    }

    static void check_queries(const py::array& q, const char* who, const std::vector<std::size_t>& shape,
                              const char* form) {
        bool same = q.ndim() == static_cast<py::ssize_t>(shape.size());
        for (std::size_t i = 0; same && i < shape.size(); ++i)
            same = static_cast<std::size_t>(q.shape(static_cast<py::ssize_t>(i))) == shape[i];
        std::ostringstream expected;
        expected << '[';
        for (std::size_t i = 0; i < shape.size(); ++i) expected << (i ? ", " : "") << shape[i];
        expected << ']';
        require(same && is_f32(q) && (q.flags() & py::array::c_style), who, ": expected queries of shape ",
                expected.str(), " ", form, ", C-contiguous float32 (kvc attends in fp32), got ", described(q),
                (q.flags() & py::array::c_style) ? "" : " (not C-contiguous)");
    }

    template <class T>
    void append_rows(std::size_t layer, const py::array& keys, const py::array& values, std::int64_t first_position) {
        const auto k = rows_of<T>(keys), v = rows_of<T>(values);
        py::gil_scoped_release unlocked;
        std::lock_guard<std::mutex> hold(lock_);
        cache_.append(layer, k, v, first_position);
    }

    // attend (chunk 0) or attend_chunk over checked queries, without the GIL:
    // out shaped as the queries, and with_mass, (out, mass per KV head).
    py::object attended(std::size_t layer, const py::array& queries, std::size_t chunk, bool with_mass) {
        std::vector<py::ssize_t> shape(queries.shape(), queries.shape() + queries.ndim());
        py::array_t<float> out(shape);
        const auto* q = static_cast<const float*>(queries.data());
        float* o = out.mutable_data();
        std::vector<float> mass;
        std::vector<std::size_t> held;
        {
            py::gil_scoped_release unlocked;
            std::lock_guard<std::mutex> hold(lock_);
            if (with_mass) mass.resize(tokens_of(layer, held));
            float* m = with_mass ? mass.data() : nullptr;
            if (chunk == 0) cache_.attend(layer, q, o, m);
            else cache_.attend_chunk(layer, q, chunk, o, m);
        }
        if (!with_mass) return std::move(out);
        return py::make_tuple(out, split(mass, held));
    }

    // tokens(layer) and each head's share of it (under lock_).
    std::size_t tokens_of(std::size_t layer, std::vector<std::size_t>& held) const {
        std::size_t total = 0;
        held.resize(cache_.config().kv_heads);
        for (std::size_t h = 0; h < held.size(); ++h) total += held[h] = cache_.tokens(layer, h);
        return total;
    }

    static py::list split(const std::vector<float>& mass, const std::vector<std::size_t>& held) {
        py::list heads;
        std::size_t at = 0;
        for (std::size_t n : held) {
            py::array_t<float> head(static_cast<py::ssize_t>(n));
            std::copy(mass.begin() + static_cast<std::ptrdiff_t>(at), mass.begin() + static_cast<std::ptrdiff_t>(at + n),
                      head.mutable_data());
            heads.append(std::move(head));
            at += n;
        }
        return heads;
    }

    std::string spec_;
    kvc::dynamic_cache cache_;
    mutable std::mutex lock_;
};

// Calibration samples: one float32 array per layer, [tokens, heads,
// head_dim] alike in heads and head_dim (tokens may differ by layer), viewed
// in place. The arrays are held so the views stay valid without the GIL.
struct samples {
    std::vector<py::array> arrays;
    std::vector<kvc::kv_view<const float, kvc::layout_strided>> views;
    std::size_t heads = 0, dim = 0;
};

samples samples_of(const py::handle& list, const char* who, const char* name, const char* heads_name) {
    require(py::isinstance<py::sequence>(list) && !py::isinstance<py::str>(list) && py::len(list) > 0, who,
            ": expected ", name, " as a non-empty list of arrays, one per layer, got ",
            std::string(py::str(py::type::handle_of(list).attr("__name__"))));
    samples s;
    for (const py::handle item : list.cast<py::sequence>()) {
        const py::array a = as_array(item, who, name);
        if (s.arrays.empty()) {
            require(a.ndim() == 3, who, ": expected ", name, " of shape [tokens, ", heads_name,
                    ", head_dim] float32 per layer, got ", described(a));
            s.heads = static_cast<std::size_t>(a.shape(1));
            s.dim = static_cast<std::size_t>(a.shape(2));
        }
        check_rows(a, who, name, heads_name, s.heads, s.dim, false);
        s.views.push_back(rows_of<float>(a));
        s.arrays.push_back(a);
    }
    return s;
}

kvc::cache_config config_of(std::size_t layers, std::size_t kv_heads, std::size_t query_heads, std::size_t dim,
                            float scale, const char* who) {
    kvc::cache_config c;
    c.layers = layers;
    c.kv_heads = kv_heads;
    c.query_heads = query_heads;
    c.head_dim = dim;
    c.scale = scale;
    kvc::detail::validate(c, who);
    return c;
}

void bind_calibration(py::module_& m) {
    using kvc::calibration::artifact;
    m.doc() = "Calibration: the artifacts the calibrated methods (kvc.methods(), calibrated=True) are built from. "
              "Inputs are lists with one float32 array per layer; the GIL is released while they run.";
    m.def(
        "query_filters",
        [](const py::handle& queries, std::size_t kv_heads) {
            const char* who = "kvc.calibration.query_filters";
            const samples q = samples_of(queries, who, "queries", "query_heads");
            const kvc::cache_config c = config_of(q.views.size(), kv_heads, q.heads, q.dim, 0.0f, who);
            py::gil_scoped_release unlocked;
            return kvc::calibration::query_filters(c, q.views);
        },
        py::arg("queries"), py::kw_only(), py::arg("kv_heads"),
        "E10 Q-Filters: per (layer, KV head), the dominant direction of its group's sample queries "
        "[samples, query_heads, head_dim]. Artifact 'qfilter', for Cache(..., artifacts={'qfilter': a}).");
    m.def(
        "head_roles",
        [](const py::handle& keys, const py::handle& queries, std::size_t sinks, std::size_t window, double threshold,
           float scale) {
            const char* who = "kvc.calibration.head_roles";
            const samples k = samples_of(keys, who, "keys", "kv_heads");
            const samples q = samples_of(queries, who, "queries", "query_heads");
            require(q.dim == k.dim, who, ": expected keys and queries of the same head_dim, got ", k.dim, " and ",
                    q.dim);
            const kvc::cache_config c = config_of(k.views.size(), k.heads, q.heads, k.dim, scale, who);
            kvc::calibration::head_role_options options;
            options.sinks = sinks;
            options.window = window;
            options.threshold = threshold;
            py::gil_scoped_release unlocked;
            return kvc::calibration::head_roles(c, k.views, q.views, options);
        },
        py::arg("keys"), py::arg("queries"), py::kw_only(), py::arg("sinks") = 4, py::arg("window") = 64,
        py::arg("threshold") = 0.1, py::arg("scale") = 0.0f,
        "B6: each KV head's attention mass beyond the sinks and the last `window` tokens (keys [T, kv_heads, "
        "head_dim] and queries [T, query_heads, head_dim] of one forward pass per layer). Artifact 'head_roles'.");
    m.def(
        "cq",
        [](const py::handle& keys, const py::handle& values, std::size_t channels_per_group, std::size_t bits,
           std::uint64_t seed, std::size_t iterations) {
            const char* who = "kvc.calibration.cq";
            const samples k = samples_of(keys, who, "keys", "kv_heads");
            const samples v = samples_of(values, who, "values", "kv_heads");
            kvc::calibration::cq_options options;
            options.channels_per_group = channels_per_group;
            options.bits = bits;
            options.seed = seed;
            options.iterations = iterations;
            py::gil_scoped_release unlocked;
            return kvc::calibration::calibrate_cq(k.views, v.views, options);
        },
        py::arg("keys"), py::arg("values"), py::kw_only(), py::arg("channels_per_group") = 4, py::arg("bits") = 8,
        py::arg("seed") = 0, py::arg("iterations") = 25,
        "Q8 CQ: k-means codebooks per (layer, KV head, channel group). Artifact 'cq', for the methods cq:c4b8 "
        "(channels_per_group=4) and cq:c8b8 (8).");
    m.def(
        "kvquant",
        [](const py::handle& keys, const py::handle& values, unsigned bits, double outlier_fraction,
           std::uint64_t seed, std::size_t kmeans_iterations, std::size_t max_kmeans_points) {
            const char* who = "kvc.calibration.kvquant";
            const samples k = samples_of(keys, who, "keys", "kv_heads");
            const samples v = samples_of(values, who, "values", "kv_heads");
            const kvc::cache_config c = config_of(k.views.size(), k.heads, k.heads, k.dim, 0.0f, who);
            kvc::calibration::kvquant_options options;
            options.bits = bits;
            options.outlier_fraction = outlier_fraction;
            options.seed = seed;
            options.kmeans_iterations = kmeans_iterations;
            options.max_kmeans_points = max_kmeans_points;
            py::gil_scoped_release unlocked;
            return kvc::calibration::calibrate_kvquant(c, k.views, v.views, options);
        },
        py::arg("keys"), py::arg("values"), py::kw_only(), py::arg("bits") = 3, py::arg("outlier_fraction") = 0.01,
        py::arg("seed") = 0, py::arg("kmeans_iterations") = 50, py::arg("max_kmeans_points") = 1 << 16,
        "Q3 KVQuant: per-channel key ranges and per-layer codebooks from keys BEFORE RoPE and values. Artifact "
        "'kvquant' (give the cache the model's RoPE: Cache(..., rope_theta=..., rope_dims=..., "
        "rope_interleaved=...)).");
}

} // namespace

PYBIND11_MODULE(_kvc, m) {
    m.doc() = "kvc: key/value cache compression for transformer inference (C++ library, Python binding)";

    // ValueError's subclass: every kvc::error is about the arguments given.
    py::register_exception<kvc::error>(m, "error", PyExc_ValueError);

    py::class_<kvc::method_info>(m, "Method", "One method of kvc.methods(): a term a spec may name.")
        .def_readonly("name", &kvc::method_info::name)
        .def_property_readonly("family", [](const kvc::method_info& i) { return std::string(kvc::name_of(i.family)); })
        .def_readonly("id", &kvc::method_info::id)
        .def_readonly("parameter", &kvc::method_info::parameter)
        .def_readonly("default", &kvc::method_info::default_value)
        .def_readonly("summary", &kvc::method_info::summary)
        .def_readonly("calibrated", &kvc::method_info::calibrated)
        .def("__repr__", [](const kvc::method_info& i) {
            std::string text = "Method(" + i.name + ", " + kvc::name_of(i.family);
            if (!i.parameter.empty()) text += ", " + i.parameter + "=" + (i.default_value.empty() ? "?" : i.default_value);
            if (i.calibrated) text += ", calibrated";
            return text + ")";
        });

    m.def(
        "methods", [] { return kvc::methods(); },
        "Every method, family by family (quantization, eviction, merging, projection).");
    m.def(
        "parse_spec",
        [](const std::string& spec) {
            py::list terms;
            for (const kvc::spec_term& t : kvc::parse_spec(spec)) terms.append(py::make_tuple(*t.method, t.value));
            return terms;
        },
        py::arg("spec"), "The (Method, value) terms of a spec such as 'kivi:2 + snapkv:0.25'; kvc.error when bad.");

    py::class_<kvc::calibration::artifact>(m, "Artifact",
                                           "A calibration artifact: a kind and named float32 tensors.")
        .def(py::init(&artifact_from), py::arg("kind"), py::arg("tensors"))
        .def_readonly("kind", &kvc::calibration::artifact::kind)
        .def_property_readonly("tensors", &tensors_of, "{name: float32 array} (copies)")
        .def(
            "save", [](const kvc::calibration::artifact& a, const std::string& path) { kvc::calibration::save(a, path); },
            py::arg("path"))
        .def("__repr__", [](const kvc::calibration::artifact& a) {
            return "Artifact(" + a.kind + ", " + std::to_string(a.tensors.size()) + " tensors)";
        });
    m.def(
        "load_artifact", [](const std::string& path) { return kvc::calibration::load(path); }, py::arg("path"),
        "Reads an artifact file (checked: magic, version, lengths, CRC-32).");
    py::module_ calibration = m.def_submodule("calibration");
    bind_calibration(calibration);

    py::class_<cache>(m, "Cache", R"(A compressed KV cache built from a spec (see kvc.methods()).

Cache(spec, layers, kv_heads, query_heads, head_dim, *, storage='f16', scale=0.0,
      evict_every=0, artifacts=None, rope_theta=10000.0, rope_dims=0, rope_interleaved=True)

storage: element type of rows kept as they are when the spec names no codec
('f32', 'f16', 'bf16'); scale: attention logit scale, 0 for 1/sqrt(head_dim);
evict_every: evict during decode whenever a head is this many tokens over
budget (0: after the prompt and on compress()); artifacts: {method name:
kvc.Artifact or path} for calibrated methods (kvc.calibration makes them);
rope_*: the model's RoPE, which KVQuant needs (rope_dims 0: all of head_dim;
rope_interleaved: pairs (2i, 2i+1), else (i, i + dims/2) as HF Llama).)")
        .def(py::init([](std::string spec, std::size_t layers, std::size_t kv_heads, std::size_t query_heads,
                         std::size_t head_dim, const std::string& storage, float scale, std::size_t evict_every,
                         const py::object& artifacts, double rope_theta, std::size_t rope_dims, bool rope_interleaved) {
                 return cache(std::move(spec), layers, kv_heads, query_heads, head_dim, storage, scale, evict_every,
                              artifacts, kvc::rope_config{rope_theta, rope_dims, rope_interleaved});
             }),
             py::arg("spec"), py::arg("layers"), py::arg("kv_heads"), py::arg("query_heads"), py::arg("head_dim"),
             py::kw_only(), py::arg("storage") = "f16", py::arg("scale") = 0.0f, py::arg("evict_every") = 0,
             py::arg("artifacts") = py::none(), py::arg("rope_theta") = 10000.0, py::arg("rope_dims") = 0,
             py::arg("rope_interleaved") = true)
        .def_property_readonly("spec", &cache::spec)
        .def_property_readonly("layers", [](const cache& c) { return c.config().layers; })
        .def_property_readonly("kv_heads", [](const cache& c) { return c.config().kv_heads; })
        .def_property_readonly("query_heads", [](const cache& c) { return c.config().query_heads; })
        .def_property_readonly("head_dim", [](const cache& c) { return c.config().head_dim; })
        .def_property_readonly("scale", [](const cache& c) { return c.config().logit_scale(); })
        .def("append", &cache::append, py::arg("layer"), py::arg("keys"), py::arg("values"),
             py::arg("first_position"),
             "Appends keys and values [tokens, kv_heads, head_dim] (float32 or float16, viewed in place) at "
             "positions first_position, first_position + 1, ...")
        .def("attend", &cache::attend, py::arg("layer"), py::arg("queries"), py::kw_only(), py::arg("mass") = false,
             "Decode attention of queries [query_heads, head_dim] float32 -> out [query_heads, head_dim]; with "
             "mass=True, (out, [per KV head: attention mass per held token, summed over its query group]).")
        .def("attend_chunk", &cache::attend_chunk, py::arg("layer"), py::arg("queries"), py::kw_only(),
             py::arg("mass") = false,
             "Causal attention of the last `chunk` appended tokens, queries [chunk, query_heads, head_dim] -> out "
             "of that shape; with mass=True, (out, [per KV head mass summed over the chunk]).")
        .def("compress", &cache::compress, py::arg("layer") = py::none(),
             "Runs eviction/merging/projection now on one layer, or on every layer.")
        .def("tokens", &cache::tokens, py::arg("layer"), py::arg("head") = py::none(),
             "Tokens held by one KV head, or by the layer (summed over its KV heads).")
        .def("tokens_seen", &cache::tokens_seen, py::arg("layer"))
        .def("next_position", &cache::next_position, py::arg("layer"))
        .def_property_readonly("bytes", &cache::bytes, "Every byte the cache holds.")
        .def("stored_bytes", &cache::stored_bytes, py::arg("layer"),
             "The bytes one attention over the layer reads: every head's rows with their scales and codebooks.")
        .def("positions", &cache::positions, py::arg("layer"), py::arg("head"),
             "Original positions of the tokens one KV head holds (int32 copy).")
        .def("attention_statistic", &cache::attention_statistic, py::arg("layer"), py::arg("head"),
             "The running attention statistic of one head (float32 copy), or None when no policy keeps one.")
        .def("set_external_scores", &cache::set_external_scores, py::arg("layer"), py::arg("head"),
             py::arg("scores"), "E18 ('external'): the scores eviction ranks one head's tokens by.")
        .def("save", &cache::save, py::arg("layer") = py::none(),
             "The cache (or one layer) as bytes, in kvc's versioned format (docs/SERIALIZATION.md).")
        .def("load", &cache::load, py::arg("data"), py::arg("layer") = py::none(),
             "Replaces the content (or one layer's) with what save() wrote; the cache must have been built with "
             "the same spec, shape and artifacts. kvc.error, and the cache unchanged, otherwise.")
        .def("fork", &cache::fork, "An independent copy.")
        .def("__copy__", &cache::fork)
        .def("__deepcopy__", [](const cache& c, const py::dict&) { return c.fork(); }, py::arg("memo"))
        .def("clear", &cache::clear, "Drops every token (the configuration stays).")
        .def("__repr__", [](const cache& c) {
            const kvc::cache_config& k = c.config();
            return "Cache('" + c.spec() + "', layers=" + std::to_string(k.layers) +
                   ", kv_heads=" + std::to_string(k.kv_heads) + ", query_heads=" + std::to_string(k.query_heads) +
                   ", head_dim=" + std::to_string(k.head_dim) + ")";
        });
}
