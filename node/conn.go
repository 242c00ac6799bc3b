package node

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
	"sync"
	"time"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/agentwire"
	"github.com/granary-build/granary/internal/paths"
)

var (
	_ core.PackageManager = (*Conn)(nil)
	_ core.ContextHandler = (*ConnHandle)(nil)
)

// ErrNodeGone is wrapped by the errors of a Conn whose node closed the
// connection (it stopped, crashed or was killed) or that was closed.
var ErrNodeGone = agentwire.ErrNodeGone

// Conn is a connection to the local node of a state directory: a
// core.PackageManager whose references live in the node (aggregated with
// the other local holders' into one etcd reference per package) and whose
// builds are one flight per package on the host, with the builder run in
// this process. It is safe for concurrent use.
//
// The references a Conn holds last until DecRef, Close, or the end of the
// connection (this process exits or is killed, or the node goes away).
// Done is closed, and a Notice sent, when the node goes away.
type Conn struct {
	c     net.Conn
	hello helloInfo

	wmu sync.Mutex
	bw  *bufio.Writer
	buf []byte // the message being written

	mu      sync.Mutex
	seq     uint64
	pending map[uint64]*call
	builds  map[uint64]*clientBuild
	err     error // why the connection ended

	events func(etcdstore.Event) // set by OnEvent
	held   map[string]int        // references this Conn holds, by package

	done    chan struct{}
	readerr chan struct{} // closed when the reader has returned
	notices chan Notice
}

// call is one request waiting for its reply.
type call struct {
	op    string
	id    string
	reply chan msg
}

// clientBuild is a build request: its builder, run when the node says so.
type clientBuild struct {
	builder func(context.Context) error
	cancel  context.CancelFunc // of the running builder
	ran     bool
	err     error // the builder's
	done    chan struct{}
}

// NoticeKind says what a Notice reports.
type NoticeKind = agentwire.NoticeKind

// Notice kinds.
const (
	// NoticeRefLost: the host's reference to ID is gone with the package
	// (the node's lease was lost and the package removed meanwhile).
	// Whoever uses the package should stop.
	NoticeRefLost = agentwire.NoticeRefLost
	// NoticeLeaseLost: the node's lease is in doubt; it is taking its
	// references again.
	NoticeLeaseLost = agentwire.NoticeLeaseLost
	// NoticeLeaseRestored: the node has a new lease.
	NoticeLeaseRestored = agentwire.NoticeLeaseRestored
	// NoticeNodeGone: the connection ended (Err says why); every reference
	// of this Conn is gone with it.
	NoticeNodeGone = agentwire.NoticeNodeGone
)

// Notice is something the node told this Conn without being asked.
type Notice = agentwire.Notice

// ConnectOptions tune ConnectWith.
type ConnectOptions struct {
	// Purpose is recorded with the connection's references (inspect
	// shows it). Default: this program's name.
	Purpose string
}

// Connect connects to the node serving stateDir (its socket is
// stateDir/agent.sock). It does not start a node; the CLI does, as today.
// It fails with an error wrapping ErrNoLocalNode if none serves it.
func Connect(ctx context.Context, stateDir string) (*Conn, error) {
	return ConnectWith(ctx, stateDir, ConnectOptions{})
}

// ConnectWith is Connect with options.
func ConnectWith(ctx context.Context, stateDir string, o ConnectOptions) (*Conn, error) {
	if o.Purpose == "" {
		o.Purpose = filepath.Base(os.Args[0])
	}
	path := filepath.Join(stateDir, AgentSocket)
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("%w (socket %s: %v)", ErrNoLocalNode, path, err)
	}
	c := &Conn{
		c: nc, bw: bufio.NewWriter(nc),
		pending: make(map[uint64]*call), builds: make(map[uint64]*clientBuild), held: make(map[string]int),
		done: make(chan struct{}), readerr: make(chan struct{}), notices: make(chan Notice, 16),
	}
	go c.read()
	r, err := c.request(ctx, wire(agentwire.Msg{Op: opHello, Purpose: o.Purpose}))
	if err == nil && r.Hello == nil {
		err = errors.New("no handshake")
	}
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("granary: handshake with the local node (%s): %w", path, err)
	}
	c.hello = *r.Hello
	return c, nil
}

// OnEvent makes fn receive the node store's events (waiting on another
// host's attempt, lock delay, failure, cache, publish) about packages this
// Conn is building or waiting for in IncRef. fn runs on the connection's reader and must not block.
func (c *Conn) OnEvent(fn func(etcdstore.Event)) {
	c.mu.Lock()
	c.events = fn
	c.mu.Unlock()
}

// Root is the shared root of the node's store.
func (c *Conn) Root() string { return c.hello.Root }

// Prefix is the etcd key prefix of the node's store.
func (c *Conn) Prefix() string { return c.hello.Prefix }

// Host is the node's host name.
func (c *Conn) Host() string { return c.hello.Host }

// NodePID is the node's process ID.
func (c *Conn) NodePID() int { return c.hello.PID }

// Done is closed when the connection has ended; Err then says why.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Err is nil while the connection is open, then why it ended (wrapping
// ErrNodeGone).
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Notices delivers what the node reports unasked, and NoticeNodeGone when
// the connection ends. Notices that find the channel full (16) are
// dropped; Done is never missed.
func (c *Conn) Notices() <-chan Notice { return c.notices }

func (c *Conn) notify(n Notice) {
	select {
	case c.notices <- n:
	default:
	}
}

// Close ends the connection: the node releases every reference this Conn
// holds (the host's etcd reference after the node's linger) before Close
// returns, and abandons builds whose builder runs here. If the node does
// not answer within 10 s, Close closes anyway and the node releases the
// references when it sees the connection end.
func (c *Conn) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	c.request(ctx, wire(agentwire.Msg{Op: opBye})) //nolint:errcheck // closing either way
	cancel()
	c.end(fmt.Errorf("%w: closed", ErrNodeGone))
	<-c.readerr
	return nil
}

// end records why the connection ends and closes it; the first call wins.
func (c *Conn) end(why error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = why
	c.pending = map[uint64]*call{}
	var cancels []context.CancelFunc
	for _, b := range c.builds {
		if b.cancel != nil {
			cancels = append(cancels, b.cancel)
		}
	}
	c.mu.Unlock()
	c.c.Close()
	for _, cancel := range cancels {
		cancel()
	}
	close(c.done) // the waiters of pending requests see it
	c.notify(Notice{Kind: NoticeNodeGone, Err: why})
}

// read dispatches the node's messages until the connection ends.
func (c *Conn) read() {
	defer close(c.readerr)
	lr := agentwire.NewLineReader(c.c)
	for {
		var m msg
		line, err := lr.Next()
		if err == nil {
			err = decodeMsg(line, &m)
		}
		if err != nil {
			c.end(fmt.Errorf("%w: %v", ErrNodeGone, err))
			return
		}
		switch m.Op {
		case opReply:
			c.mu.Lock()
			cl := c.pending[m.Seq]
			delete(c.pending, m.Seq)
			c.mu.Unlock()
			if cl != nil {
				cl.reply <- m
			}
		case opBuildNow:
			c.runBuilder(m.Seq)
		case opBuildStop:
			c.mu.Lock()
			if b := c.builds[m.Seq]; b != nil && b.cancel != nil {
				b.cancel()
			}
			c.mu.Unlock()
		case opEvent:
			c.mu.Lock()
			fn := c.events
			c.mu.Unlock()
			if fn != nil && m.Event != nil {
				fn(m.Event.event())
			}
		case opRefLost, opLeaseLost, opLeaseBack:
			n, _ := agentwire.NoticeOf(m.Msg)
			c.notify(n)
		}
	}
}

// send writes m.
func (c *Conn) send(m msg) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.buf = appendMsg(c.buf[:0], &m)
	_, err := c.bw.Write(c.buf)
	if err == nil {
		err = c.bw.Flush()
	}
	if err != nil {
		err = fmt.Errorf("%w: %v", ErrNodeGone, err)
		c.end(err)
	}
	return err
}

// request sends m with a new sequence number and waits for the reply. If
// ctx ends first, an IncRef that the node grants later is given back.
func (c *Conn) request(ctx context.Context, m msg) (msg, error) {
	cl := &call{op: m.Op, id: m.ID, reply: make(chan msg, 1)}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return msg{}, err
	}
	c.seq++
	m.Seq = c.seq
	c.pending[m.Seq] = cl
	c.mu.Unlock()
	if err := c.send(m); err != nil {
		return msg{}, err
	}
	select {
	case r := <-cl.reply:
		return r, remoteErr(r.Msg)
	case <-c.done:
		select {
		case r := <-cl.reply:
			return r, remoteErr(r.Msg)
		default:
		}
		return msg{}, c.Err()
	case <-ctx.Done():
		if m.Op == opIncRef {
			// The node may still grant it: give it back when it does.
			go func() {
				select {
				case r := <-cl.reply:
					if r.OK {
						c.request(context.Background(), wire(agentwire.Msg{Op: opDecRef, ID: m.ID})) //nolint:errcheck // Close releases it anyway
					}
				case <-c.done:
				}
			}()
		} else {
			c.mu.Lock()
			delete(c.pending, m.Seq)
			c.mu.Unlock()
		}
		return msg{}, ctx.Err()
	}
}

// runBuilder runs the builder of build request seq, from its own
// goroutine, and sends the result.
func (c *Conn) runBuilder(seq uint64) {
	c.mu.Lock()
	b := c.builds[seq]
	if b == nil || b.ran || c.err != nil {
		c.mu.Unlock()
		if b == nil {
			c.send(wire(agentwire.Msg{Op: opBuilt, Seq: seq, Err: "granary: no such build", Codes: []string{"abandon"}})) //nolint:errcheck
		}
		return
	}
	b.ran = true
	bctx, cancel := context.WithCancel(context.WithValue(context.Background(), builderKey{}, builderRef{c, seq}))
	b.cancel = cancel
	c.mu.Unlock()
	go func() {
		defer cancel()
		err := callBuilder(bctx, b.builder)
		c.mu.Lock()
		b.err = err
		c.mu.Unlock()
		close(b.done)
		m := wire(agentwire.Msg{Op: opBuilt, Seq: seq})
		if err != nil {
			m.Err = err.Error()
			if errors.Is(err, etcdstore.ErrAbandon) {
				m.Codes = []string{"abandon"}
			}
			if m.Err == "" {
				m.Err = "builder failed"
			}
		}
		c.send(m) //nolint:errcheck // a dead connection abandons the attempt anyway
	}()
}

type builderKey struct{}

// builderRef names the build request whose builder a context belongs to.
type builderRef struct {
	c   *Conn
	seq uint64
}

// BuilderProcessGroup tells the node that the builder whose context is
// ctx (the one a ConnHandle.BuildContext builder receives) runs processes
// in process group pgid. If this process dies mid-build, the node kills
// that group when it abandons the attempt, so that no builder outlives
// its attempt. It reports false if ctx is not such a builder's context.
func BuilderProcessGroup(ctx context.Context, pgid int) bool {
	r, ok := ctx.Value(builderKey{}).(builderRef)
	if !ok {
		return false
	}
	return r.c.send(wire(agentwire.Msg{Op: opBuilderPG, Seq: r.seq, PID: pgid})) == nil
}

// callBuilder calls builder, turning a panic into an error.
func callBuilder(ctx context.Context, builder func(context.Context) error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("builder panicked: %v\n%s", r, debug.Stack())
		}
	}()
	return builder(ctx)
}

// Get returns the handler of package id. It does no I/O.
func (c *Conn) Get(id string) core.PackageHandler { return c.Handle(id) }

// Handle is Get with the concrete type, which has the context variants.
func (c *Conn) Handle(id string) *ConnHandle {
	return &ConnHandle{c: c, id: id, err: core.ValidateID(id)}
}

// Inspect returns the package's etcd record (as Store.Inspect) and the
// local references held through the node, oldest first.
func (c *Conn) Inspect(ctx context.Context, id string) (etcdstore.Info, []Holder, error) {
	r, err := c.request(ctx, wire(agentwire.Msg{Op: opInspect, ID: id}))
	if err != nil {
		return etcdstore.Info{}, nil, err
	}
	if r.Info == nil {
		return etcdstore.Info{}, nil, errors.New("granary: inspect: empty answer")
	}
	return *r.Info, r.Holders, nil
}

// ConnHandle is one package of a Conn.
type ConnHandle struct {
	c   *Conn
	id  string
	err error
}

// ID returns the package ID.
func (h *ConnHandle) ID() string { return h.id }

// OutputDirectory is <root>/pkgs/<id>/contents (etcdstore's layout), or ""
// for an invalid ID.
func (h *ConnHandle) OutputDirectory() string {
	if h.err != nil {
		return ""
	}
	return paths.Contents(h.c.hello.Root, h.id)
}

// LoggingDirectory is <root>/pkgs/<id>/logs, or "" for an invalid ID.
func (h *ConnHandle) LoggingDirectory() string {
	if h.err != nil {
		return ""
	}
	return filepath.Join(h.c.hello.Root, "pkgs", h.id, "logs")
}

func (h *ConnHandle) fail(op string, err error) error {
	return fmt.Errorf("granary: %s %q: %w", op, h.id, err)
}

// IncRef is IncRefContext with a background context.
func (h *ConnHandle) IncRef() error { return h.IncRefContext(context.Background()) }

// DecRef is DecRefContext with a background context.
func (h *ConnHandle) DecRef() error { return h.DecRefContext(context.Background()) }

// TryRemove is TryRemoveContext with a background context.
func (h *ConnHandle) TryRemove() (bool, error) { return h.TryRemoveContext(context.Background()) }

// Build is BuildContext with a background context.
func (h *ConnHandle) Build(builder func() error) error {
	return h.BuildContext(context.Background(), func(context.Context) error { return builder() })
}

// IncRefContext takes a reference held by the node for this connection.
// If the host holds the package already, the node answers from memory;
// otherwise it takes the host's etcd reference (etcdstore's IncRef) first.
// It returns an error wrapping core.ErrPackageNotExist if the package is
// not available.
func (h *ConnHandle) IncRefContext(ctx context.Context) error {
	if h.err != nil {
		return h.fail("incref", h.err)
	}
	if _, err := h.c.request(ctx, wire(agentwire.Msg{Op: opIncRef, ID: h.id})); err != nil {
		return h.fail("incref", err)
	}
	h.c.mu.Lock()
	h.c.held[h.id]++
	h.c.mu.Unlock()
	return nil
}

// DecRefContext releases the newest reference this connection holds on
// the package (an error wrapping etcdstore.ErrNoRef if it holds none, known
// without asking the node). The host's etcd reference goes after the
// node's linger if no other local holder has the package. It waits for the
// node's answer, so that a TryRemove from any other connection that starts
// after it returns sees the reference gone.
func (h *ConnHandle) DecRefContext(ctx context.Context) error {
	if h.err != nil {
		return h.fail("decref", h.err)
	}
	c := h.c
	c.mu.Lock()
	if c.held[h.id] == 0 {
		c.mu.Unlock()
		return h.fail("decref", etcdstore.ErrNoRef)
	}
	c.held[h.id]--
	if c.held[h.id] == 0 {
		delete(c.held, h.id)
	}
	c.mu.Unlock()
	if _, err := c.request(ctx, wire(agentwire.Msg{Op: opDecRef, ID: h.id})); err != nil {
		return h.fail("decref", err)
	}
	return nil
}

// TryRemoveContext removes the package unless a reference (local or of any
// host) or a build holds it. A host reference that only lingers, with no
// local holder, does not keep it.
func (h *ConnHandle) TryRemoveContext(ctx context.Context) (bool, error) {
	if h.err != nil {
		return false, h.fail("remove", h.err)
	}
	r, err := h.c.request(ctx, wire(agentwire.Msg{Op: opTryRemove, ID: h.id}))
	if err != nil {
		return false, h.fail("remove", err)
	}
	return r.OK, nil
}

// BuildContext makes the package available as etcdstore's BuildContext
// does, with the node's store: callers on this host share one attempt,
// whose builder runs in the process of one of them (this one, if the node
// says so, with a context that ends when the node stops the attempt). If
// the process running the builder goes away, the node abandons the
// attempt and the other callers try again with their own builders. A
// failure of this process's builder is wrapped in the returned error.
func (h *ConnHandle) BuildContext(ctx context.Context, builder func(ctx context.Context) error) error {
	_, err := h.BuildOutcome(ctx, builder)
	return err
}

// BuildOutcome is BuildContext that also says how the package came to be
// available, from the node's side: Built means this host's attempt built
// it (with this process's builder if it ran, else another local caller's),
// Waited that another host did.
func (h *ConnHandle) BuildOutcome(ctx context.Context, builder func(ctx context.Context) error) (etcdstore.Outcome, error) {
	if h.err != nil {
		return etcdstore.Outcome{}, h.fail("build", h.err)
	}
	c := h.c
	b := &clientBuild{builder: builder, done: make(chan struct{})}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return etcdstore.Outcome{}, h.fail("build", err)
	}
	c.seq++
	seq := c.seq
	cl := &call{op: opBuild, id: h.id, reply: make(chan msg, 1)}
	c.pending[seq] = cl
	c.builds[seq] = b
	c.mu.Unlock()
	defer func() {
		// Forget the request once its builder, if it ran, has returned: the
		// node may still wait for its result on behalf of other callers.
		go func() {
			c.mu.Lock()
			ran := b.ran
			c.mu.Unlock()
			if ran {
				select {
				case <-b.done:
				case <-c.done:
				}
			}
			c.mu.Lock()
			delete(c.builds, seq)
			c.mu.Unlock()
		}()
	}()
	if err := c.send(wire(agentwire.Msg{Op: opBuild, Seq: seq, ID: h.id})); err != nil {
		return etcdstore.Outcome{}, h.fail("build", err)
	}
	var r msg
	select {
	case r = <-cl.reply:
	case <-c.done:
		select {
		case r = <-cl.reply:
		default:
			return etcdstore.Outcome{}, h.fail("build", c.Err())
		}
	case <-ctx.Done():
		c.mu.Lock()
		delete(c.pending, seq)
		c.mu.Unlock()
		c.send(wire(agentwire.Msg{Op: opCancel, Seq: seq})) //nolint:errcheck
		return etcdstore.Outcome{}, h.fail("build", ctx.Err())
	}
	if r.OK {
		var out etcdstore.Outcome
		if r.Outcome != nil {
			out = *r.Outcome
		}
		return out, nil
	}
	re := &RemoteError{Msg: r.Err, Codes: r.Codes}
	c.mu.Lock()
	ran := b.ran
	c.mu.Unlock()
	if ran {
		select {
		case <-b.done:
			re.own = b.err
		case <-c.done:
		}
	}
	return etcdstore.Outcome{}, h.fail("build", re)
}
