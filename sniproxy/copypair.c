/* The copy and splice relays' pairs in C (userspace_relay.py keeps the same pairs in
 * Python, which serve where this module is not built).
 *
 * A Python pair costs each wakeup the event loop's call into Python, two method
 * calls, the socket objects' argument parsing and a watcher object whenever what a
 * direction waits for changes: that is most of a short connection's user time
 * (bench/results/2026-11-29-connrate-profile). Here a wakeup is a C call from libev
 * with the system calls made on descriptors, and Python runs only when the pair
 * ends or is handed on. A splice relay's Copier moves a direction through a pipe
 * (splice_relay.py says why, and when a direction holds one) instead of its buffer.
 *
 * The watchers live in gevent's own libev loop, the one the worker's hub runs, so
 * they are served in the same iterations as every Python watcher. gevent exports
 * libev's functions from its corecext module, and builds libev without a data
 * pointer in its watchers (EV_COMMON empty); the structs below are that layout.
 * libev calls watchers with the GIL released (gevent runs ev_run nogil).
 *
 * Semantics are the Python pair's, line for line: see UserspacePair for why each
 * rule is as it is. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* libev 4, as gevent builds it */
struct ev_loop;
typedef struct ev_io {
    int active, pending, priority;
    void (*cb)(struct ev_loop *, struct ev_io *, int);
    void *next;
    int fd, events;
} ev_io;
typedef struct ev_timer {
    int active, pending, priority;
    void (*cb)(struct ev_loop *, struct ev_timer *, int);
    double at, repeat;
} ev_timer;
#define EV_READ 1
#define EV_WRITE 2
#define EV__IOFDSET 0x80

static void (*ev_io_start)(struct ev_loop *, ev_io *);
static void (*ev_io_stop)(struct ev_loop *, ev_io *);
static void (*ev_timer_start)(struct ev_loop *, ev_timer *);
static void (*ev_timer_stop)(struct ev_loop *, ev_timer *);

#define READS_PER_TURN 8     /* so that one busy direction cannot starve the other */
#define RATE_SPAN 1.0        /* relay.RATE_SPAN */
#define SMALL_MESSAGE 1024   /* relay.SMALL_MESSAGE */

static PyObject *S_done, *S_reset, *S_idle_timeout, *S_fast, *S_chatty, *S_quiet, *S_leaving;

typedef struct Pair Pair;

typedef struct {
    ev_io w;               /* first: libev hands back &w */
    Pair *pair;
    int src, dst;
    char *pending;         /* bytes read that dst could not take yet */
    Py_ssize_t pending_len, pending_off;
    int pipe_r, pipe_w;    /* splice: the pipe it holds while bytes are in it, else -1 */
    Py_ssize_t in_pipe;    /* splice: bytes read into it that dst could not take yet */
    int eof;               /* src sent its FIN (carried to dst once pending is empty) */
    int watched;           /* 0, EV_READ (src) or EV_WRITE (dst) */
    long long count, reads;
} Direction;

typedef struct {
    PyObject_HEAD
    struct ev_loop *loop;
    char *buffer;          /* one per relay: callbacks run one at a time */
    Py_ssize_t size;
    Py_ssize_t pipe_size;  /* > 0: the splice relay's, moving bytes through pipes */
    int (*pool)[2];        /* its empty pipes, for the next pairs */
    int pooled, pool_size;
    PyObject *pairs;       /* the relay's set of live pairs */
    PyObject *result;      /* relay.RelayResult */
    PyObject *kind;
} Copier;

struct Pair {
    PyObject_HEAD
    Copier *copier;
    Direction up, down;
    ev_timer timer;        /* the idle limit and the handoff's window, whichever is first */
    double idle, half_closed;   /* half_closed < 0: none */
    PyObject *handoff;     /* None or relay.Handoff */
    double h_bytes, h_after, h_quiet, h_messages, h_rate;
    double handoff_due, last;
    long long window_base, window_reads;
    PyObject *due_outcome; /* borrowed interned string, or NULL */
    PyObject *on_done;     /* NULL once ended or cancelled */
};

static PyTypeObject PairType, CopierType;

static double monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* --- moving bytes --------------------------------------------------------- */

/* Bytes read that dst could not take yet: in hand, or in its pipe. */
static int holding(const Direction *d)
{
    return d->pending != NULL || d->in_pipe > 0;
}

static Py_ssize_t send_some(int fd, const char *data, Py_ssize_t len)
{
    Py_ssize_t n;
    do {
        n = send(fd, data, len, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return n;
}

/* 1 if sent or kept, 0 if dst kept some back (now pending), -1 on an error */
static int forward(Direction *d, const char *buf, Py_ssize_t n)
{
    Py_ssize_t sent = send_some(d->dst, buf, n);
    if (sent < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return -1;
        sent = 0;
    }
    if (sent == n)
        return 1;
    d->pending = malloc(n - sent);
    if (d->pending == NULL) {
        errno = ENOMEM;
        return -1;
    }
    memcpy(d->pending, buf + sent, n - sent);
    d->pending_len = n - sent;
    d->pending_off = 0;
    return 0;
}

static void drop_pending(Direction *d)
{
    free(d->pending);
    d->pending = NULL;
}

/* --- through a pipe (the splice relay) ------------------------------------- */

static Py_ssize_t splice_some(int from, int to, Py_ssize_t len)
{
    Py_ssize_t n;
    do {
        n = splice(from, NULL, to, NULL, len, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    } while (n < 0 && errno == EINTR);
    return n;
}

static int take_pipe(Copier *copier, Direction *d)
{
    int fds[2];
    if (copier->pooled > 0) {
        copier->pooled--;
        fds[0] = copier->pool[copier->pooled][0];
        fds[1] = copier->pool[copier->pooled][1];
    } else {
        if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0)
            return -1;
        /* above fs.pipe-max-size without CAP_SYS_RESOURCE: the default 64 KiB still works */
        (void)fcntl(fds[1], F_SETPIPE_SZ, (int)copier->pipe_size);
    }
    d->pipe_r = fds[0];
    d->pipe_w = fds[1];
    return 0;
}

/* d's empty pipe goes back to the pool, if it has room. Else it stays with d while the
 * pair lives (more busy pairs than the pool holds: no pipe made per read), and is closed
 * at its end (ending), as is a pipe with bytes left in it: they must never reach another
 * connection. */
static void give_back(Copier *copier, Direction *d, int empty, int ending)
{
    if (d->pipe_r < 0)
        return;
    if (empty && copier->pooled < copier->pool_size) {
        copier->pool[copier->pooled][0] = d->pipe_r;
        copier->pool[copier->pooled][1] = d->pipe_w;
        copier->pooled++;
    } else if (empty && !ending) {
        return;
    } else {
        close(d->pipe_r);
        close(d->pipe_w);
    }
    d->pipe_r = d->pipe_w = -1;
    d->in_pipe = 0;
}

/* What is in the pipe now (a pair that ended on an error may have left bytes there). */
static int pipe_empty(const Direction *d)
{
    int queued = 0;
    return ioctl(d->pipe_r, FIONREAD, &queued) == 0 && queued == 0;
}

/* --- one direction, through the buffer (copy) or a pipe (splice) ------------ */

/* Send on what d holds: bytes sent, or -1 (errno). */
static Py_ssize_t flush_held(Copier *copier, Direction *d)
{
    if (copier->pipe_size > 0) {
        Py_ssize_t sent = splice_some(d->pipe_r, d->dst, d->in_pipe);
        if (sent >= 0 && (d->in_pipe -= sent) == 0)
            give_back(copier, d, 1, 0);
        return sent;
    }
    Py_ssize_t sent = send_some(d->dst, d->pending + d->pending_off, d->pending_len - d->pending_off);
    if (sent >= 0 && (d->pending_off += sent) == d->pending_len)
        drop_pending(d);
    return sent;
}

/* Read what src has: bytes read, 0 at its FIN, or -1 (errno). */
static Py_ssize_t read_in(Copier *copier, Direction *d)
{
    Py_ssize_t n;
    if (copier->pipe_size > 0) {
        if (d->pipe_r < 0 && take_pipe(copier, d) < 0)
            return -1;
        n = splice_some(d->src, d->pipe_w, copier->pipe_size);
        if (n == 0 || (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)))
            give_back(copier, d, 1, 0);   /* nothing came: as empty as it was taken */
        return n;
    }
    do {
        n = recv(d->src, copier->buffer, copier->size, MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    return n;
}

/* Send on the n bytes just read, and hold what dst cannot take yet: 1 if all went, 0 if
 * some is held, -1 on an error. */
static int pass_on(Copier *copier, Direction *d, Py_ssize_t n)
{
    if (copier->pipe_size == 0)
        return forward(d, copier->buffer, n);
    Py_ssize_t sent = splice_some(d->pipe_r, d->dst, n);
    if (sent < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return -1;
        sent = 0;
    }
    if (sent < n) {
        d->in_pipe = n - sent;   /* waits in the pipe */
        return 0;
    }
    give_back(copier, d, 1, 0);   /* empty: it held exactly the n bytes just read */
    return 1;
}

/* What can move now without waiting: 1 if anything did, 0 if not, -1 on an error. */
static int move(Copier *copier, Direction *d)
{
    if (holding(d)) {
        if (flush_held(copier, d) < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
        if (!holding(d) && d->eof && shutdown(d->dst, SHUT_WR) < 0)
            return -1;
        return 1;   /* a point with nothing in hand: where a Chain may hand the pair on */
    }
    if (d->eof)
        return 0;
    Py_ssize_t most = copier->pipe_size > 0 ? copier->pipe_size : copier->size;
    int moved = 0;
    for (int i = 0; i < READS_PER_TURN; i++) {
        Py_ssize_t n = read_in(copier, d);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            return -1;
        }
        moved = 1;
        if (n == 0) {
            d->eof = 1;
            if (shutdown(d->dst, SHUT_WR) < 0)
                return -1;
            break;
        }
        d->count += n;
        d->reads++;
        int all = pass_on(copier, d, n);
        if (all < 0)
            return -1;
        if (!all || n < most)
            break;   /* the reader is full, or the receive queue is empty now */
    }
    return moved;
}

/* --- the pair ------------------------------------------------------------- */

static void on_io(struct ev_loop *loop, ev_io *w, int revents);
static void on_timer(struct ev_loop *loop, ev_timer *w, int revents);

static void watch(Pair *p, Direction *d)
{
    int wanted = holding(d) ? EV_WRITE : d->eof ? 0 : EV_READ;
    if (wanted == d->watched)
        return;
    struct ev_loop *loop = p->copier->loop;
    if (d->watched)
        ev_io_stop(loop, &d->w);
    if (wanted) {
        d->w.fd = wanted == EV_READ ? d->src : d->dst;
        d->w.events = wanted | EV__IOFDSET;
        ev_io_start(loop, &d->w);
    }
    d->watched = wanted;
}

static int half_closed(Pair *p)
{
    return p->up.eof || p->down.eof;
}

static double idle_due(Pair *p)
{
    double limit = p->idle;
    if (half_closed(p) && p->half_closed >= 0 && p->half_closed < limit)
        limit = p->half_closed;
    return p->last + limit;
}

static PyObject *handoff_ready(Pair *p, double now)
{
    if (p->handoff == Py_None || half_closed(p))
        return NULL;
    if (p->due_outcome == NULL) {
        double moved = (double)(p->up.count + p->down.count - p->window_base);
        double reads = (double)(p->up.reads + p->down.reads - p->window_reads);
        double age = now - (p->handoff_due - p->h_after);
        if (moved >= p->h_bytes || moved >= p->h_rate * (age > RATE_SPAN ? age : RATE_SPAN))
            p->due_outcome = S_fast;
        else if (reads >= p->h_messages && moved <= reads * SMALL_MESSAGE)
            p->due_outcome = S_chatty;
        else if (now >= p->handoff_due) {
            if (moved <= p->h_quiet)
                p->due_outcome = S_quiet;
            else {   /* a busy window: judge the next one */
                p->window_base += (long long)moved;
                p->window_reads += (long long)reads;
                p->handoff_due = now + p->h_after;
            }
        }
    }
    return !holding(&p->up) && !holding(&p->down) ? p->due_outcome : NULL;
}

static void set_timer(Pair *p, double now)
{
    double due = idle_due(p);
    if (!half_closed(p) && p->handoff_due > now && p->handoff_due < due)
        due = p->handoff_due;   /* once past, on_io hands off when nothing is in hand */
    struct ev_loop *loop = p->copier->loop;
    if (p->timer.active)
        ev_timer_stop(loop, &p->timer);
    p->timer.at = due > now ? due - now : 0.0;
    p->timer.repeat = 0.0;
    ev_timer_start(loop, &p->timer);
}

/* Stop its watchers and free the bytes and pipes it holds (at its end, and as it is freed). */
static void quiesce(Pair *p)
{
    struct ev_loop *loop = p->copier->loop;
    Direction *dirs[2] = {&p->up, &p->down};
    for (int i = 0; i < 2; i++) {
        if (dirs[i]->watched)
            ev_io_stop(loop, &dirs[i]->w);
        dirs[i]->watched = 0;
        drop_pending(dirs[i]);
        if (dirs[i]->pipe_r >= 0)
            give_back(p->copier, dirs[i], pipe_empty(dirs[i]), 1);
    }
    if (p->timer.active)
        ev_timer_stop(loop, &p->timer);
}

/* Stop watching and let go of what the pair holds; on_done is not called. */
static void stop(Pair *p)
{
    quiesce(p);
    if (PySet_Discard(p->copier->pairs, (PyObject *)p) < 0)
        PyErr_WriteUnraisable((PyObject *)p);
}

static void end(Pair *p, PyObject *outcome)
{
    stop(p);
    PyObject *on_done = p->on_done;
    if (on_done == NULL)
        return;
    p->on_done = NULL;
    PyObject *result = PyObject_CallFunction(p->copier->result, "LLOO", p->up.count, p->down.count, outcome,
                                             p->copier->kind);
    PyObject *r = result ? PyObject_CallOneArg(on_done, result) : NULL;
    if (r == NULL)
        PyErr_WriteUnraisable(on_done);   /* a bug must not stop the loop */
    Py_XDECREF(r);
    Py_XDECREF(result);
    Py_DECREF(on_done);
}

static void ready(Pair *p, Direction *d)
{
    int was_half_closed = half_closed(p);
    int moved = move(p->copier, d);
    if (moved < 0)              /* a reset is an outcome, not a worker error */
        return end(p, S_reset);
    double now = monotonic();
    if (moved)
        p->last = now;
    if (p->up.eof && p->down.eof && !holding(&p->up) && !holding(&p->down))
        return end(p, S_done);
    PyObject *outcome = handoff_ready(p, now);
    if (outcome != NULL)
        return end(p, outcome);
    watch(p, d);
    if (!was_half_closed && half_closed(p) && p->half_closed >= 0)
        set_timer(p, now);      /* the half-closed limit may be the shorter one */
}

static void timed(Pair *p)
{
    double now = monotonic();
    if (now >= idle_due(p))
        return end(p, S_idle_timeout);
    PyObject *outcome = handoff_ready(p, now);
    if (outcome != NULL)
        return end(p, outcome);
    set_timer(p, now);   /* woken early: activity, a busy window, or a byte in hand at the handoff */
}

static void on_io(struct ev_loop *loop, ev_io *w, int revents)
{
    Direction *d = (Direction *)w;
    Pair *p = d->pair;
    PyGILState_STATE gil = PyGILState_Ensure();
    Py_INCREF(p);   /* on_done may drop the last other reference */
    ready(p, d);
    Py_DECREF(p);
    PyGILState_Release(gil);
}

static void on_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    Pair *p = (Pair *)((char *)w - offsetof(Pair, timer));
    PyGILState_STATE gil = PyGILState_Ensure();
    Py_INCREF(p);
    timed(p);
    Py_DECREF(p);
    PyGILState_Release(gil);
}

static void init_direction(Pair *p, Direction *d, int src, int dst)
{
    memset(&d->w, 0, sizeof d->w);
    d->w.cb = on_io;
    d->pair = p;
    d->src = src;
    d->dst = dst;
    d->pipe_r = d->pipe_w = -1;
}

static PyObject *Pair_cancel(Pair *p, PyObject *unused)
{
    stop(p);
    Py_CLEAR(p->on_done);
    Py_RETURN_NONE;
}

static PyObject *Pair_leave(Pair *p, PyObject *unused)
{
    if (p->on_done != NULL) {
        p->due_outcome = S_leaving;
        Py_INCREF(p);
        timed(p);
        Py_DECREF(p);
    }
    Py_RETURN_NONE;
}

static void Pair_dealloc(Pair *p)
{
    if (p->copier != NULL)   /* NULL only when making it failed: nothing started, nothing held */
        quiesce(p);
    Py_XDECREF(p->on_done);
    Py_XDECREF(p->handoff);
    Py_XDECREF(p->copier);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyMethodDef Pair_methods[] = {
    {"cancel", (PyCFunction)Pair_cancel, METH_NOARGS, "Stop relaying; on_done is not called."},
    {"leave", (PyCFunction)Pair_leave, METH_NOARGS,
     "The worker is leaving: stop with outcome \"leaving\" at the next point with no byte in hand."},
    {NULL}
};

static PyMemberDef Pair_members[] = {
    {"on_done", T_OBJECT, offsetof(Pair, on_done), READONLY, "told the RelayResult at the end"},
    {"handoff", T_OBJECT, offsetof(Pair, handoff), READONLY, "when a Chain's relay stops it, or None"},
    {NULL}
};

static PyTypeObject PairType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sniproxy.copypair.Pair",
    .tp_basicsize = sizeof(Pair),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One pair in the copy relay; made by Copier.pair.",
    .tp_dealloc = (destructor)Pair_dealloc,
    .tp_methods = Pair_methods,
    .tp_members = Pair_members,
};

/* --- the copier: one per relay -------------------------------------------- */

static int bind_libev(const char *library)
{
    if (ev_io_start != NULL)
        return 0;
    void *lib = dlopen(library, RTLD_NOW | RTLD_NOLOAD);
    if (lib == NULL) {
        PyErr_Format(PyExc_OSError, "gevent's libev is not loaded: %s", dlerror());
        return -1;
    }
    int (*major)(void) = (int (*)(void))dlsym(lib, "ev_version_major");
    void *start = dlsym(lib, "ev_io_start"), *io_stop = dlsym(lib, "ev_io_stop");
    void *t_start = dlsym(lib, "ev_timer_start"), *t_stop = dlsym(lib, "ev_timer_stop");
    if (major == NULL || start == NULL || io_stop == NULL || t_start == NULL || t_stop == NULL || major() != 4) {
        PyErr_SetString(PyExc_OSError, "gevent's module does not export libev 4");
        return -1;
    }
    ev_io_start = (void (*)(struct ev_loop *, ev_io *))start;
    ev_io_stop = (void (*)(struct ev_loop *, ev_io *))io_stop;
    ev_timer_start = (void (*)(struct ev_loop *, ev_timer *))t_start;
    ev_timer_stop = (void (*)(struct ev_loop *, ev_timer *))t_stop;
    return 0;
}

static int Copier_init(Copier *self, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"loop", "library", "size", "pairs", "result", "kind", "pipe_size", "pool_size", NULL};
    unsigned long long loop;
    const char *library;
    Py_ssize_t size, pipe_size = 0;
    int pool_size = 0;
    PyObject *pairs, *result, *kind;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "KsnO!OU|ni", names, &loop, &library, &size, &PySet_Type, &pairs,
                                     &result, &kind, &pipe_size, &pool_size))
        return -1;
    if (loop == 0 || (size <= 0 && pipe_size <= 0) || pipe_size < 0 || pool_size < 0 || self->loop != NULL) {
        PyErr_SetString(PyExc_ValueError, "a loop, and a buffer or pipe size, are needed (once)");
        return -1;
    }
    if (bind_libev(library) < 0)
        return -1;
    if (pipe_size == 0 && (self->buffer = malloc(size)) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (pool_size > 0 && (self->pool = calloc(pool_size, sizeof *self->pool)) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->loop = (struct ev_loop *)(uintptr_t)loop;
    self->size = size;
    self->pipe_size = pipe_size;
    self->pool_size = pool_size;
    Py_INCREF(pairs);
    Py_XSETREF(self->pairs, pairs);
    Py_INCREF(result);
    Py_XSETREF(self->result, result);
    Py_INCREF(kind);
    Py_XSETREF(self->kind, kind);
    return 0;
}

static double item_double(PyObject *tuple, Py_ssize_t i)
{
    PyObject *item = PySequence_GetItem(tuple, i);
    if (item == NULL)
        return -1.0;
    double value = PyFloat_AsDouble(item);
    Py_DECREF(item);
    return value;
}

static PyObject *Copier_pair(Copier *self, PyObject *const *args, Py_ssize_t nargs)
{
    /* pair(client_fd, upstream_fd, idle, half_closed, handoff, on_done) */
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "pair() takes client_fd, upstream_fd, idle, half_closed, handoff, on_done");
        return NULL;
    }
    int c = PyLong_AsLong(args[0]), u = PyLong_AsLong(args[1]);
    double idle = PyFloat_AsDouble(args[2]);
    double half = args[3] == Py_None ? -1.0 : PyFloat_AsDouble(args[3]);
    PyObject *handoff = args[4];
    if (PyErr_Occurred())
        return NULL;
    Pair *p = PyObject_New(Pair, &PairType);
    if (p == NULL)
        return NULL;
    memset((char *)p + sizeof(PyObject), 0, sizeof(Pair) - sizeof(PyObject));
    init_direction(p, &p->up, c, u);   /* first: a pair freed on an error below holds no pipe (-1, not fd 0) */
    init_direction(p, &p->down, u, c);
    Py_INCREF(self);
    p->copier = self;
    Py_INCREF(handoff);
    p->handoff = handoff;
    Py_INCREF(args[5]);
    p->on_done = args[5];
    p->idle = idle;
    p->half_closed = half;
    p->last = monotonic();
    p->handoff_due = INFINITY;
    if (handoff != Py_None) {
        p->h_bytes = item_double(handoff, 0);
        p->h_after = item_double(handoff, 1);
        p->h_quiet = item_double(handoff, 2);
        p->h_messages = item_double(handoff, 3);
        p->h_rate = item_double(handoff, 4);
        if (PyErr_Occurred()) {
            Py_DECREF(p);
            return NULL;
        }
        p->handoff_due = p->last + p->h_after;
    }
    p->timer.cb = on_timer;
    if (PySet_Add(self->pairs, (PyObject *)p) < 0) {
        Py_DECREF(p);
        return NULL;
    }
    watch(p, &p->up);
    watch(p, &p->down);
    set_timer(p, p->last);
    return (PyObject *)p;
}

/* The relay is closing: its pooled pipes are closed, and no pipe is pooled from now on. */
static PyObject *Copier_close(Copier *self, PyObject *unused)
{
    for (int i = 0; i < self->pooled; i++) {
        close(self->pool[i][0]);
        close(self->pool[i][1]);
    }
    self->pooled = self->pool_size = 0;
    Py_RETURN_NONE;
}

static PyObject *Copier_get_pooled(Copier *self, void *unused)
{
    return PyLong_FromLong(self->pooled);
}

static PyGetSetDef Copier_getset[] = {
    {"pooled", (getter)Copier_get_pooled, NULL, "empty pipes kept for the next pairs (splice)", NULL},
    {NULL}
};

static void Copier_dealloc(Copier *self)
{
    Py_XDECREF(Copier_close(self, NULL));
    free(self->pool);
    free(self->buffer);
    Py_XDECREF(self->pairs);
    Py_XDECREF(self->result);
    Py_XDECREF(self->kind);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Copier_methods[] = {
    {"pair", (PyCFunction)(void (*)(void))Copier_pair, METH_FASTCALL,
     "pair(client_fd, upstream_fd, idle, half_closed, handoff, on_done): relay between the two descriptors "
     "from now on, until both directions are done or the handoff is due; then on_done(RelayResult)."},
    {"close", (PyCFunction)Copier_close, METH_NOARGS, "Close the pooled pipes; pool none from now on."},
    {NULL}
};

static PyTypeObject CopierType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sniproxy.copypair.Copier",
    .tp_basicsize = sizeof(Copier),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Copier(loop, library, size, pairs, result, kind, pipe_size=0, pool_size=0): the copy relay's "
              "pairs on gevent's libev loop (its address, and the module that exports libev), with one buffer of "
              "size bytes; or, with a pipe_size, the splice relay's, through pipes of that size (pool_size kept "
              "for the next pairs). Each live pair is in the set pairs, and ends with result(up, down, outcome, "
              "kind).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Copier_init,
    .tp_dealloc = (destructor)Copier_dealloc,
    .tp_methods = Copier_methods,
    .tp_getset = Copier_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sniproxy.copypair", "The copy and splice relays' pairs in C, on gevent's libev loop.", -1,
};

PyMODINIT_FUNC PyInit_copypair(void)
{
    if (PyType_Ready(&PairType) < 0 || PyType_Ready(&CopierType) < 0)
        return NULL;
    PyObject **strings[] = {&S_done, &S_reset, &S_idle_timeout, &S_fast, &S_chatty, &S_quiet, &S_leaving};
    const char *texts[] = {"done", "reset", "idle_timeout", "fast", "chatty", "quiet", "leaving"};
    for (int i = 0; i < 7; i++)
        if ((*strings[i] = PyUnicode_InternFromString(texts[i])) == NULL)
            return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Copier", (PyObject *)&CopierType) < 0 ||
        PyModule_AddObjectRef(m, "Pair", (PyObject *)&PairType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
