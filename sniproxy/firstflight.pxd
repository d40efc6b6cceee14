# The types Cython compiles firstflight.py with (setup.py). Lengths and offsets become C
# integers, and indexing the ClientHello's bytes a C load. The parsers' inputs stay
# untyped: a caller may pass bytes or a bytearray.
cimport cython

cpdef normalize_name(raw)
cdef bint _is_ip_literal(name) except -1
@cython.locals(end=Py_ssize_t, i=Py_ssize_t, c=cython.uchar, hexadecimal=bint)
cdef bint _is_number(bytes name, Py_ssize_t start) except -1
@cython.locals(label=Py_ssize_t, i=Py_ssize_t, c=cython.uchar)
cdef bint _is_host_name(bytes name) except -1

cpdef parse_client_hello(data)

@cython.locals(payload=bytearray, offset=Py_ssize_t, length=Py_ssize_t, body_length=Py_ssize_t)
cdef _reassemble_client_hello(data)

cdef int _check_record_header(header, bint first) except -1

@cython.locals(stop=Py_ssize_t)
cdef Py_ssize_t _vector_end(bytes data, Py_ssize_t pos, int length_size, Py_ssize_t end, str what) except -1

@cython.locals(end=Py_ssize_t, session_end=Py_ssize_t, suites_end=Py_ssize_t, compression_end=Py_ssize_t,
               extensions=dict)
cdef _parse_client_hello_body(bytes body)

@cython.locals(ext_type=int, start=Py_ssize_t)
cdef dict _extensions(bytes body, Py_ssize_t pos, Py_ssize_t end)

@cython.locals(pos=Py_ssize_t, value_end=Py_ssize_t)
cdef tuple _server_name(bytes body, Py_ssize_t start, Py_ssize_t end)

@cython.locals(pos=Py_ssize_t, name_end=Py_ssize_t, names=list)
cdef tuple _alpn(bytes body, Py_ssize_t start, Py_ssize_t end)
