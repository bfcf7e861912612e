/* The compiled fast path of decoding: canonical llm.token spans straight from the wire.
 *
 * scan(data, earliest_ns, latest_ns) walks a serialized ExportTraceServiceRequest and
 * takes out every span of the one shape tokentrace's emitters give a token emission
 * (see is_canonical below): for those it writes the token_spans table's columns, already
 * in ClickHouse's Native layout, and it copies everything else -- other spans, resources,
 * scopes, unknown fields -- into a residual request that the general (Python) decoder
 * parses as before. It returns None when there is no such span, and also whenever
 * anything about the bytes is not plainly well formed: then the caller decodes the
 * original request in Python, which accepts or refuses it as it always has. So this
 * code never decides that a request is bad; it only ever answers "these spans are
 * canonical, here are their rows" for spans whose every byte it has checked.
 *
 * The bytes are untrusted: every read is bounds-checked against the end of its
 * enclosing message, lengths are checked before any pointer arithmetic, and memory is
 * bounded by the input (the residual is never longer than the request, each token row
 * is a fixed 132 bytes for at least 150 bytes of span).
 *
 * collector/ingest/tokenspans.py holds the pure-Python twin (same rows, from the parsed
 * request) and the Python side of the columns.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* -- growable byte buffers --------------------------------------------------------- */

typedef struct {
    uint8_t *data;
    size_t len;
    size_t cap;
} Buf;

static int buf_reserve(Buf *b, size_t extra) {
    if (b->len + extra <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra) {
        if (cap > ((size_t)1 << 40))
            return -1;
        cap *= 2;
    }
    uint8_t *p = PyMem_Realloc(b->data, cap);
    if (!p)
        return -1;
    b->data = p;
    b->cap = cap;
    return 0;
}

static int buf_put(Buf *b, const void *src, size_t n) {
    if (buf_reserve(b, n) < 0)
        return -1;
    if (n)
        memcpy(b->data + b->len, src, n);
    b->len += n;
    return 0;
}

static int buf_varint(Buf *b, uint64_t v) {
    uint8_t tmp[10];
    size_t n = 0;
    while (v >= 0x80) {
        tmp[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    tmp[n++] = (uint8_t)v;
    return buf_put(b, tmp, n);
}

static int buf_le64(Buf *b, uint64_t v) {
    uint8_t tmp[8];
    for (int i = 0; i < 8; i++)
        tmp[i] = (uint8_t)(v >> (8 * i));
    return buf_put(b, tmp, 8);
}

static int buf_hex(Buf *b, const uint8_t *raw, size_t n) {
    /* A Native String: its length as a varint (n * 2 < 128 here), then lower-case hex. */
    static const char digits[] = "0123456789abcdef";
    if (buf_reserve(b, 1 + 2 * n) < 0)
        return -1;
    uint8_t *out = b->data + b->len;
    *out++ = (uint8_t)(2 * n);
    for (size_t i = 0; i < n; i++) {
        *out++ = (uint8_t)digits[raw[i] >> 4];
        *out++ = (uint8_t)digits[raw[i] & 15];
    }
    b->len += 1 + 2 * n;
    return 0;
}

static void buf_free(Buf *b) {
    PyMem_Free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

/* -- reading the wire format ------------------------------------------------------- */

/* A varint at *p (before end): 0 and *p moved past it, or -1 if it runs past end or
 * is longer than 10 bytes. *wide is set when a 10th byte holds more than the top bit
 * (a value over 64 bits, which the caller treats as "not canonical"). */
static int read_varint(const uint8_t **p, const uint8_t *end, uint64_t *out, int *wide) {
    uint64_t v = 0;
    const uint8_t *q = *p;
    for (int i = 0; i < 10; i++) {
        if (q >= end)
            return -1;
        uint8_t c = *q++;
        v |= (uint64_t)(c & 0x7F) << (7 * i);
        if (!(c & 0x80)) {
            if (wide)
                *wide = (i == 9 && c > 1);
            *p = q;
            *out = v;
            return 0;
        }
    }
    return -1;
}

typedef struct {
    uint32_t number;
    int wire;
    const uint8_t *start;  /* the field's first byte (its tag) */
    const uint8_t *value;  /* its value: for wire type 2, the payload */
    uint64_t num;          /* varint value, fixed value, or payload length */
    int wide;
} Field;

/* The next field of the message [*p, end): 1 and *p moved past it, 0 at the end, -1 if
 * malformed (truncated, a group, field number 0, an impossible wire type). */
static int next_field(const uint8_t **p, const uint8_t *end, Field *f) {
    const uint8_t *q = *p;
    if (q >= end)
        return 0;
    uint64_t tag;
    if (read_varint(&q, end, &tag, NULL) < 0 || tag > 0xFFFFFFFFu)
        return -1;
    f->start = *p;
    f->number = (uint32_t)(tag >> 3);
    f->wire = (int)(tag & 7);
    f->wide = 0;
    if (f->number == 0)
        return -1;
    switch (f->wire) {
    case 0:
        f->value = q;
        if (read_varint(&q, end, &f->num, &f->wide) < 0)
            return -1;
        break;
    case 1:
        if (end - q < 8)
            return -1;
        f->value = q;
        f->num = 0;
        for (int i = 0; i < 8; i++)
            f->num |= (uint64_t)q[i] << (8 * i);
        q += 8;
        break;
    case 2: {
        uint64_t n;
        if (read_varint(&q, end, &n, NULL) < 0 || n > (uint64_t)(end - q))
            return -1;
        f->value = q;
        f->num = n;
        q += n;
        break;
    }
    case 5:
        if (end - q < 4)
            return -1;
        f->value = q;
        f->num = (uint64_t)q[0] | (uint64_t)q[1] << 8 | (uint64_t)q[2] << 16 |
                 (uint64_t)q[3] << 24;
        q += 4;
        break;
    default: /* 3, 4: groups (not in OTLP); 6, 7: no such wire type */
        return -1;
    }
    *p = q;
    return 1;
}

/* -- the canonical token span ------------------------------------------------------ */

/* Attribute keys of a token span in the order the emitters set them
 * (instrument/recorder.py); the sixth is optional. tokenspans.py checks these against
 * schemas/attributes.py when it loads this module. */
static const char *const TOKEN_KEYS[] = {
    "tokentrace.emission.index", "tokentrace.token.index", "tokentrace.token.count",
    "tokentrace.engine.step",    "tokentrace.batch.size",  "tokentrace.step.prefill_tokens",
};
#define N_KEYS 6
#define N_REQUIRED_KEYS 5

typedef struct {
    const uint8_t *trace_id, *span_id, *parent_id;
    uint64_t start, end;
    int64_t values[N_KEYS];
    int n_values;
} TokenSpan;

static int all_zero(const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

static int bytes_equal(const Field *f, const char *text) {
    size_t n = strlen(text);
    return f->num == n && memcmp(f->value, text, n) == 0;
}

/* One KeyValue whose key must be TOKEN_KEYS[k] and whose value an int: 1 and *out set,
 * 0 if it is anything else. */
static int token_attribute(const uint8_t *p, const uint8_t *end, int k, int64_t *out) {
    Field f;
    int have_key = 0, have_value = 0, r;
    while ((r = next_field(&p, end, &f)) == 1) {
        if (f.number == 1 && f.wire == 2 && !have_key) {
            if (!bytes_equal(&f, TOKEN_KEYS[k]))
                return 0;
            have_key = 1;
        } else if (f.number == 2 && f.wire == 2 && !have_value) {
            /* AnyValue holding exactly one int_value (field 3) */
            const uint8_t *q = f.value, *qend = f.value + f.num;
            Field g;
            int have_int = 0, s;
            while ((s = next_field(&q, qend, &g)) == 1) {
                if (g.number != 3 || g.wire != 0 || have_int || g.wide)
                    return 0;
                *out = (int64_t)g.num;
                have_int = 1;
            }
            if (s < 0 || !have_int)
                return 0;
            have_value = 1;
        } else {
            return 0;
        }
    }
    return r == 0 && have_key && have_value;
}

/* An empty Status, or one whose code is 0 (unset) and message empty. */
static int unset_status(const uint8_t *p, const uint8_t *end) {
    Field f;
    int r;
    while ((r = next_field(&p, end, &f)) == 1) {
        if (f.number == 3 && f.wire == 0 && f.num == 0 && !f.wide)
            continue;
        if (f.number == 2 && f.wire == 2 && f.num == 0)
            continue;
        return 0;
    }
    return r == 0;
}

/* Whether the Span message [p, end) is a canonical token span, one the general decoder
 * would accept and store as the token_spans row written from *t:
 *   name "llm.token", kind INTERNAL, no trace state, events or links, status unset;
 *   a 16-byte trace id and 8-byte span and parent ids, none all zeros;
 *   start not 0 nor before earliest, end not before start nor after latest;
 *   attributes exactly the five TOKEN_KEYS in order, or all six, each an int.
 * Dropped counts (10, 12, 14) and flags (16) are allowed: the decoder ignores them.
 * Any field set twice, or any other field, makes the span not canonical. */
static int is_canonical(const uint8_t *p, const uint8_t *end, uint64_t earliest,
                        uint64_t latest, TokenSpan *t) {
    Field f;
    uint32_t seen = 0;
    int r;
    t->n_values = 0;
    while ((r = next_field(&p, end, &f)) == 1) {
        uint32_t bit = f.number < 32 ? (1u << f.number) : 0;
        if (f.number != 9) {
            if (!bit || (seen & bit))
                return 0;
            seen |= bit;
        }
        switch (f.number) {
        case 1:
            if (f.wire != 2 || f.num != 16 || all_zero(f.value, 16))
                return 0;
            t->trace_id = f.value;
            break;
        case 2:
            if (f.wire != 2 || f.num != 8 || all_zero(f.value, 8))
                return 0;
            t->span_id = f.value;
            break;
        case 4:
            if (f.wire != 2 || f.num != 8 || all_zero(f.value, 8))
                return 0;
            t->parent_id = f.value;
            break;
        case 5:
            if (f.wire != 2 || !bytes_equal(&f, "llm.token"))
                return 0;
            break;
        case 6:
            if (f.wire != 0 || f.num != 1 || f.wide)
                return 0;
            break;
        case 7:
            if (f.wire != 1)
                return 0;
            t->start = f.num;
            break;
        case 8:
            if (f.wire != 1)
                return 0;
            t->end = f.num;
            break;
        case 9:
            if (f.wire != 2 || t->n_values >= N_KEYS ||
                !token_attribute(f.value, f.value + f.num, t->n_values,
                                 &t->values[t->n_values]))
                return 0;
            t->n_values++;
            break;
        case 10:
        case 12:
        case 14:
            if (f.wire != 0 || f.wide || f.num > 0xFFFFFFFFu)
                return 0;
            break;
        case 15:
            if (f.wire != 2 || !unset_status(f.value, f.value + f.num))
                return 0;
            break;
        case 16:
            if (f.wire != 5)
                return 0;
            break;
        default:
            return 0;
        }
    }
    if (r != 0)
        return 0;
    const uint32_t required = (1u << 1) | (1u << 2) | (1u << 4) | (1u << 5) | (1u << 6) |
                              (1u << 7) | (1u << 8);
    if ((seen & required) != required)
        return 0;
    if (t->n_values < N_REQUIRED_KEYS)
        return 0;
    if (t->start == 0 || t->start < earliest || t->end < t->start || t->end > latest)
        return 0;
    return 1;
}

/* -- the scan ---------------------------------------------------------------------- */

enum {
    C_TIMESTAMP,
    C_DURATION,
    C_TRACE_ID,
    C_SPAN_ID,
    C_PARENT_ID,
    C_EMISSION,
    C_TOKEN,
    C_COUNT,
    C_STEP,
    C_BATCH,
    C_PREFILL_NULL,
    C_PREFILL,
    N_COLUMNS
};

typedef struct {
    Buf out, resource, scope;
    Buf columns[N_COLUMNS];
    Py_ssize_t rows;
    PyObject *runs; /* [(r, s, n), ...] in row order */
    PyObject *kept; /* {(r, s): [original index of each span left in the residual]} */
    Buf kept_scope; /* this scope's kept indices, as Py_ssize_t */
    uint64_t earliest, latest;
} Scan;

static int add_row(Scan *sc, const TokenSpan *t) {
    Buf *c = sc->columns;
    if (buf_le64(&c[C_TIMESTAMP], t->start) < 0 ||
        buf_le64(&c[C_DURATION], t->end - t->start) < 0 ||
        buf_hex(&c[C_TRACE_ID], t->trace_id, 16) < 0 ||
        buf_hex(&c[C_SPAN_ID], t->span_id, 8) < 0 ||
        buf_hex(&c[C_PARENT_ID], t->parent_id, 8) < 0)
        return -1;
    for (int k = 0; k < N_REQUIRED_KEYS; k++)
        if (buf_le64(&c[C_EMISSION + k], (uint64_t)t->values[k]) < 0)
            return -1;
    uint8_t null = t->n_values > N_REQUIRED_KEYS ? 0 : 1;
    uint64_t prefill = null ? 0 : (uint64_t)t->values[N_REQUIRED_KEYS];
    if (buf_put(&c[C_PREFILL_NULL], &null, 1) < 0 || buf_le64(&c[C_PREFILL], prefill) < 0)
        return -1;
    sc->rows++;
    return 0;
}

static int note_run(Scan *sc, Py_ssize_t r, Py_ssize_t s) {
    Py_ssize_t n = PyList_GET_SIZE(sc->runs);
    if (n) {
        PyObject *last = PyList_GET_ITEM(sc->runs, n - 1);
        if (PyLong_AsSsize_t(PyTuple_GET_ITEM(last, 0)) == r &&
            PyLong_AsSsize_t(PyTuple_GET_ITEM(last, 1)) == s) {
            Py_ssize_t count = PyLong_AsSsize_t(PyTuple_GET_ITEM(last, 2));
            PyObject *bumped = Py_BuildValue("(nnn)", r, s, count + 1);
            if (!bumped)
                return -1;
            return PyList_SetItem(sc->runs, n - 1, bumped);
        }
    }
    PyObject *run = Py_BuildValue("(nnn)", r, s, (Py_ssize_t)1);
    if (!run)
        return -1;
    int rc = PyList_Append(sc->runs, run);
    Py_DECREF(run);
    return rc;
}

/* Append field f, as it was on the wire, to b. */
static int copy_field(Buf *b, const Field *f, const uint8_t *field_end) {
    return buf_put(b, f->start, (size_t)(field_end - f->start));
}

/* Append a length-delimited field number `number` holding `payload` to b. */
static int put_message(Buf *b, uint32_t number, const Buf *payload) {
    if (buf_varint(b, ((uint64_t)number << 3) | 2) < 0 || buf_varint(b, payload->len) < 0)
        return -1;
    return buf_put(b, payload->data, payload->len);
}

/* Result codes: 0 ok, 1 malformed (give up: decode in Python), -1 Python error. */
static int scan_scope(Scan *sc, const uint8_t *p, const uint8_t *end, Py_ssize_t r,
                      Py_ssize_t s) {
    Field f;
    int rc;
    Py_ssize_t index = 0, removed = 0;
    sc->scope.len = 0;
    sc->kept_scope.len = 0;
    while ((rc = next_field(&p, end, &f)) == 1) {
        if (f.number == 2 && f.wire == 2) {
            TokenSpan t;
            if (is_canonical(f.value, f.value + f.num, sc->earliest, sc->latest, &t)) {
                if (add_row(sc, &t) < 0 || note_run(sc, r, s) < 0)
                    return -1;
                removed++;
            } else {
                if (copy_field(&sc->scope, &f, p) < 0 ||
                    buf_put(&sc->kept_scope, &index, sizeof index) < 0)
                    return -1;
            }
            index++;
        } else if (copy_field(&sc->scope, &f, p) < 0) {
            return -1;
        }
    }
    if (rc < 0)
        return 1;
    Py_ssize_t kept = (Py_ssize_t)(sc->kept_scope.len / sizeof(Py_ssize_t));
    if (removed && kept) {
        PyObject *list = PyList_New(kept);
        if (!list)
            return -1;
        const Py_ssize_t *ix = (const Py_ssize_t *)sc->kept_scope.data;
        for (Py_ssize_t i = 0; i < kept; i++) {
            PyObject *v = PyLong_FromSsize_t(ix[i]);
            if (!v) {
                Py_DECREF(list);
                return -1;
            }
            PyList_SET_ITEM(list, i, v);
        }
        PyObject *key = Py_BuildValue("(nn)", r, s);
        int bad = !key || PyDict_SetItem(sc->kept, key, list) < 0;
        Py_XDECREF(key);
        Py_DECREF(list);
        if (bad)
            return -1;
    }
    return 0;
}

static int scan_resource(Scan *sc, const uint8_t *p, const uint8_t *end, Py_ssize_t r) {
    Field f;
    int rc;
    Py_ssize_t s = 0;
    sc->resource.len = 0;
    while ((rc = next_field(&p, end, &f)) == 1) {
        if (f.number == 2 && f.wire == 2) {
            int sub = scan_scope(sc, f.value, f.value + f.num, r, s++);
            if (sub)
                return sub;
            if (put_message(&sc->resource, 2, &sc->scope) < 0)
                return -1;
        } else if (copy_field(&sc->resource, &f, p) < 0) {
            return -1;
        }
    }
    return rc < 0 ? 1 : 0;
}

static int scan_request(Scan *sc, const uint8_t *p, const uint8_t *end) {
    Field f;
    int rc;
    Py_ssize_t r = 0;
    while ((rc = next_field(&p, end, &f)) == 1) {
        if (f.number == 1 && f.wire == 2) {
            int sub = scan_resource(sc, f.value, f.value + f.num, r++);
            if (sub)
                return sub;
            if (put_message(&sc->out, 1, &sc->resource) < 0)
                return -1;
        } else if (copy_field(&sc->out, &f, p) < 0) {
            return -1;
        }
    }
    return rc < 0 ? 1 : 0;
}

static PyObject *scan(PyObject *self, PyObject *args) {
    Py_buffer view;
    unsigned long long earliest, latest;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*KK", &view, &earliest, &latest))
        return NULL;
    Scan sc;
    memset(&sc, 0, sizeof sc);
    sc.earliest = earliest;
    sc.latest = latest;
    PyObject *result = NULL;
    sc.runs = PyList_New(0);
    sc.kept = PyDict_New();
    if (!sc.runs || !sc.kept)
        goto done;
    const uint8_t *data = view.buf;
    int rc = scan_request(&sc, data, data + view.len);
    if (rc < 0)
        goto done;
    if (rc > 0 || sc.rows == 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *columns = PyTuple_New(N_COLUMNS);
    if (!columns)
        goto done;
    for (int i = 0; i < N_COLUMNS; i++) {
        PyObject *b =
            PyBytes_FromStringAndSize((const char *)sc.columns[i].data, sc.columns[i].len);
        if (!b) {
            Py_DECREF(columns);
            goto done;
        }
        PyTuple_SET_ITEM(columns, i, b);
    }
    PyObject *residual = PyBytes_FromStringAndSize((const char *)sc.out.data, sc.out.len);
    if (!residual) {
        Py_DECREF(columns);
        goto done;
    }
    result = Py_BuildValue("(NnNOO)", residual, sc.rows, columns, sc.runs, sc.kept);
done:
    Py_XDECREF(sc.runs);
    Py_XDECREF(sc.kept);
    buf_free(&sc.out);
    buf_free(&sc.resource);
    buf_free(&sc.scope);
    buf_free(&sc.kept_scope);
    for (int i = 0; i < N_COLUMNS; i++)
        buf_free(&sc.columns[i]);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(data, earliest_ns, latest_ns) -> None or (residual, rows, columns, runs, kept)\n\n"
     "Take the canonical llm.token spans out of a serialized ExportTraceServiceRequest:\n"
     "`columns` are the token_spans columns in Native layout, `runs` (r, s, n) say which\n"
     "resource and scope each run of rows came from, `kept` maps (r, s) to the original\n"
     "index of each span left in the `residual` request. None: decode it all in Python."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tokenscan",
    "Canonical llm.token spans from OTLP protobuf bytes (see tokenspans.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tokenscan(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    PyObject *keys = PyTuple_New(N_KEYS);
    if (!keys) {
        Py_DECREF(m);
        return NULL;
    }
    for (int i = 0; i < N_KEYS; i++) {
        PyObject *key = PyUnicode_FromString(TOKEN_KEYS[i]);
        if (!key) {
            Py_DECREF(keys);
            Py_DECREF(m);
            return NULL;
        }
        PyTuple_SET_ITEM(keys, i, key);
    }
    if (PyModule_AddObject(m, "TOKEN_KEYS", keys) < 0) {
        Py_DECREF(keys);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
