package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/granary-build/granary/core"
)

var (
	_ core.PackageManager = (*Conn)(nil)
	_ core.ContextHandler = (*Handle)(nil)
	_ core.NeedsHandler   = (*Handle)(nil)
)

// Conn is a connection to the local node of a state directory: a
// core.PackageManager whose references live in the node (aggregated with
// the other local holders' into one etcd reference per package) and whose
// builds are one flight per package on the host, with the builder run in
// this process. It is safe for concurrent use.
//
// The references a Conn holds last until DecRef, Close, or the end of the
// connection (this process exits or is killed, or the node goes away).
// Done is closed, and a Notice sent, when the node goes away: at once if a
// caller is waiting for a reply, else when the idle watcher reads (see
// idleMin: for a process that made a few requests, within tens of
// milliseconds of the last; after a busy spell, at most 0.2 s).
type Conn struct {
	f     *os.File // the connected socket
	hello Hello

	wmu sync.Mutex
	bw  *bufio.Writer
	buf []byte // the message being written

	// The socket has one reader at a time, whoever holds the turn (a
	// token in turn): a caller waiting for its reply reads itself, and
	// dispatches whatever else comes, rather than have a reader goroutine
	// hand each reply over (a wake-up on another thread per message). When
	// no caller reads, the idle watcher takes the turn and reads, so that
	// what the node says unasked (Notices, Done) is not left in the socket
	// while the process is idle.
	turn  chan struct{}
	lr    *LineReader   // the socket's messages; only the turn's holder reads
	turns atomic.Uint64 // turns callers gave back: activity, for the idle watcher
	seen  atomic.Uint64 // turns as the idle watcher last saw it
	idle  *time.Timer   // the idle watcher
	armed chan struct{} // closed once idle is set: its first run may come first
	every atomic.Int64  // the idle watcher's period (watch)

	mu      sync.Mutex
	seq     uint64
	pending map[uint64]*call
	builds  map[uint64]*clientBuild
	err     error          // why the connection ended
	events  func(Event)    // set by OnEvent
	held    map[string]int // references this Conn holds, by package
	free    []*call        // calls whose replies were taken, for reuse (send)
	waiting chan struct{}  // an event arrived: a request waits for a build
	done    chan struct{}  // closed when the connection ends
	notices chan Notice    // what the node said unasked
}

// The idle watcher's period: idleMin after a connection is made and
// whenever the watcher has read (the connection was idle); doubled, up to
// idleMax, each time the watcher finds that callers gave the turn back
// since it last looked (they read then). It reads once it finds none did
// for a whole period: about twice as long after the last request as the
// requests went on, at most 2·idleMax. A short timer pending all the time
// would cost a busy connection dearly: each time the process goes idle
// between two messages, the runtime's poller then sleeps with a timeout,
// whose timer the kernel arms and disarms (measured on a 2-vCPU VM, an
// IncRef+DecRef pair to another process took ~10 µs longer, of ~40, with a
// 5 ms timer pending; +3 µs, within the noise, with a 100 ms one, as with
// 1 s).
const (
	idleMin = 5 * time.Millisecond
	idleMax = 100 * time.Millisecond
)

// maxFree bounds a Conn's calls kept for reuse.
const maxFree = 8

// recycle keeps cl, whose reply its caller has taken, for another request.
func (c *Conn) recycle(cl *call) {
	c.mu.Lock()
	if len(c.free) < maxFree {
		c.free = append(c.free, cl)
	}
	c.mu.Unlock()
}

// call is one request waiting for its reply.
type call struct {
	op    string
	id    string
	reply chan Msg
}

// Options tune ConnectWith and ConnectHold.
type Options struct {
	// Purpose is recorded with the connection's references (inspect
	// shows it). Default: this program's name.
	Purpose string
}

// Connect connects to the node serving stateDir (its socket is
// stateDir/agent.sock) and shakes hands. It does not start a node. It
// fails with an error wrapping ErrNoLocalNode if none listens there.
func Connect(ctx context.Context, stateDir string) (*Conn, error) {
	return ConnectWith(ctx, stateDir, Options{})
}

// ConnectWith is Connect with options.
func ConnectWith(ctx context.Context, stateDir string, o Options) (*Conn, error) {
	c, err := dial(stateDir)
	if err != nil {
		return nil, err
	}
	s := c.sendHello(o.purpose(), true)
	if err := c.hello1(ctx, s); err != nil {
		return nil, err
	}
	return c, nil
}

// ConnectHold connects as ConnectWith does and takes a reference to id
// held by the node for this connection, sending the handshake and the
// IncRef at once so that both take one round trip. err (wrapping
// ErrNoLocalNode if no node listens) is the connection's; incref is the
// IncRef's: an error wrapping core.ErrPackageNotExist if the package is
// not available, or, with noWait, ErrWaiting as soon as the node reports
// that the reference waits for a build in progress (the reference is then
// given back if the node grants it later). The reference comes from
// whichever node serves stateDir: check Hello before using it.
func ConnectHold(ctx context.Context, stateDir string, o Options, id string, noWait bool) (c *Conn, incref, err error) {
	if c, err = dial(stateDir); err != nil {
		return nil, nil, err
	}
	h := c.Handle(id)
	// The IncRef goes with the handshake unless its ID is invalid or its
	// caller has given up already: then nothing is sent for it.
	inc := sent{err: h.err}
	if inc.err == nil {
		inc.err = ctx.Err()
	}
	hello := c.sendHello(o.purpose(), inc.err != nil) // else flushed with the IncRef
	if inc.err == nil {
		inc = c.send(Msg{Op: OpIncRef, ID: id}, true)
	}
	if err := c.hello1(ctx, hello); err != nil {
		return nil, nil, err
	}
	if h.err != nil {
		return c, h.fail(OpIncRef, h.err), nil
	}
	return c, h.incref(ctx, inc, noWait), nil
}

func (o Options) purpose() string {
	if o.Purpose != "" {
		return o.Purpose
	}
	return filepath.Base(os.Args[0])
}

// dial connects to stateDir's socket and arms the idle watcher.
func dial(stateDir string) (*Conn, error) {
	path := SocketPath(stateDir)
	f, err := dialUnix(path)
	if err != nil {
		return nil, fmt.Errorf("%w (socket %s: %v)", ErrNoLocalNode, path, err)
	}
	c := &Conn{
		f: f, bw: bufio.NewWriter(f), turn: make(chan struct{}, 1), lr: NewLineReader(f),
		pending: make(map[uint64]*call), builds: make(map[uint64]*clientBuild), held: make(map[string]int),
		waiting: make(chan struct{}, 1), done: make(chan struct{}), notices: make(chan Notice, 16),
	}
	c.turn <- struct{}{}
	c.every.Store(int64(idleMin))
	c.armed = make(chan struct{})
	c.idle = time.AfterFunc(idleMin, c.watch)
	close(c.armed)
	return c, nil
}

// sent is a request sent: its call, or why it was not sent.
type sent struct {
	cl  *call
	seq uint64
	err error
}

// sendHello sends the handshake (without flush, it waits in the buffer for
// the next message).
func (c *Conn) sendHello(purpose string, flush bool) sent {
	return c.send(Msg{Op: OpHello, Purpose: purpose}, flush)
}

// hello1 waits for the handshake's answer; on failure it closes c.
func (c *Conn) hello1(ctx context.Context, s sent) error {
	r, err := c.await(ctx, s, false)
	if err == nil && r.Hello == nil {
		err = errors.New("no handshake in the answer")
	}
	if err != nil {
		c.Close()
		return fmt.Errorf("handshake with the local node (%s): %w", c.f.Name(), err)
	}
	c.hello = *r.Hello
	return nil
}

// OnEvent makes fn receive the node store's events (waiting on another
// host's attempt, lock delay, failure, cache, publish) about packages this
// Conn is building or waiting for in IncRef. fn runs on the goroutine that
// reads the connection (a caller waiting for its reply, or the idle
// watcher) and must not block; nil stops them.
func (c *Conn) OnEvent(fn func(Event)) {
	c.mu.Lock()
	c.events = fn
	c.mu.Unlock()
}

// Hello is what the node said of itself in the handshake.
func (c *Conn) Hello() Hello { return c.hello }

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
// references when it sees the connection end. Closing twice is a no-op.
func (c *Conn) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	c.request(ctx, Msg{Op: OpBye}) //nolint:errcheck // closing either way
	cancel()
	c.end(nodeGone("closed"))
	c.idle.Stop()
	<-c.turn // whoever read has returned: nothing is dispatched after Close
	c.turn <- struct{}{}
	return nil
}

// goneErr is why a connection ended: ErrNodeGone and a reason, as
// fmt.Errorf("%w: %v") would say it, made without fmt: a short-lived
// client (granary-run) that closes its connection would otherwise load
// fmt for this error alone (~20-60 µs, cold, on a 2-core VM).
type goneErr struct{ why string }

func nodeGone(why string) error { return &goneErr{why} }

func (e *goneErr) Error() string { return ErrNodeGone.Error() + ": " + e.why }

func (e *goneErr) Unwrap() error { return ErrNodeGone }

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
	c.f.Close()
	for _, cancel := range cancels {
		cancel()
	}
	close(c.done) // the waiters of pending requests see it
	c.notify(Notice{Kind: NoticeNodeGone, Err: why})
}

// next reads the node's next message; the caller holds the turn. A read
// deadline (interrupt) is cleared and the read goes on, unless ctx has
// ended: then it returns ctx's error. Any other error ends the connection
// and is returned.
func (c *Conn) next(ctx context.Context, m *Msg) error {
	for {
		line, err := c.lr.Next()
		if err == nil {
			if err = Decode(line, m); err == nil {
				return nil
			}
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			c.f.SetReadDeadline(time.Time{}) //nolint:errcheck // the file is pollable (dialUnix)
			if err := ctx.Err(); err != nil {
				return err
			}
			continue // meant for an earlier reader
		}
		err = nodeGone(err.Error())
		c.end(err)
		return err
	}
}

// interrupt cuts short the read of the turn's holder, whose context
// ended.
func (c *Conn) interrupt() {
	c.f.SetReadDeadline(time.Unix(1, 0)) //nolint:errcheck // the file is pollable (dialUnix)
}

// dispatch acts on one message from the node.
func (c *Conn) dispatch(m *Msg) {
	switch m.Op {
	case OpReply:
		c.replied(*m)
	case OpBuildNow:
		c.runBuilder(m.Seq)
	case OpBuildStop:
		c.stopBuilder(m.Seq)
	case OpEvent:
		c.event(m.Event)
	default:
		if n, ok := noticeOf(m); ok {
			c.notify(n)
		}
	}
}

// readFor reads and dispatches the node's messages, holding the turn,
// until cl's reply has come or the connection ends (nil: the caller finds
// either), ctx ends (its error) or, with waiting, a store event came
// (ErrWaiting); then it gives the turn back.
func (c *Conn) readFor(ctx context.Context, cl *call, waiting chan struct{}) error {
	defer func() {
		c.turns.Add(1)
		c.turn <- struct{}{}
	}()
	if ctx.Done() != nil {
		stop := context.AfterFunc(ctx, c.interrupt)
		defer stop()
	}
	var m Msg
	for len(cl.reply) == 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		select {
		case <-waiting:
			return ErrWaiting
		case <-c.done:
			return nil
		default:
		}
		if err := c.next(ctx, &m); err != nil {
			return ctx.Err() // nil if the connection ended
		}
		c.dispatch(&m)
	}
	return nil
}

// watch is the idle watcher, a timer: if no caller gave the turn back
// since it last looked and nobody holds the turn, it reads and dispatches
// the node's messages until a reply comes (a caller is back; callers read
// from then on) or the connection ends; else it looks again later (see
// idleMin).
func (c *Conn) watch() {
	<-c.armed
	select {
	case <-c.done:
		return
	default:
	}
	if n := c.turns.Load(); n != c.seen.Swap(n) {
		every := min(2*c.every.Load(), int64(idleMax))
		c.every.Store(every)
		c.idle.Reset(time.Duration(every))
		return
	}
	select {
	case <-c.turn:
	default: // a caller reads
		c.idle.Reset(time.Duration(c.every.Load()))
		return
	}
	var m Msg
	for {
		if err := c.next(context.Background(), &m); err != nil {
			c.turn <- struct{}{}
			return
		}
		c.dispatch(&m)
		if m.Op == OpReply { // a caller is back: it reads from now on
			c.turn <- struct{}{}
			c.every.Store(int64(idleMin))
			c.idle.Reset(idleMin)
			return
		}
	}
}

// replied hands a reply to its request. It does so under c.mu (the reply
// channel has room for the one reply), so that a request that gives up
// and leaves pending knows that no reply comes after it left.
func (c *Conn) replied(m Msg) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cl := c.pending[m.Seq]; cl != nil {
		delete(c.pending, m.Seq)
		cl.reply <- m
	}
}

// event passes a store event to OnEvent's function and wakes a request
// that must not wait for a build.
func (c *Conn) event(e *Event) {
	select {
	case c.waiting <- struct{}{}:
	default:
	}
	c.mu.Lock()
	fn := c.events
	c.mu.Unlock()
	if fn != nil && e != nil {
		fn(*e)
	}
}

// write writes m, flushing unless told not to; a failed write ends the
// connection.
func (c *Conn) write(m *Msg, flush bool) error {
	c.wmu.Lock()
	c.buf = AppendMsg(c.buf[:0], m)
	_, err := c.bw.Write(c.buf)
	if err == nil && flush {
		err = c.bw.Flush()
	}
	c.wmu.Unlock()
	if err != nil {
		err = nodeGone(err.Error())
		c.end(err)
	}
	return err
}

// send sends m with a new sequence number; its reply will come to the
// call it returns.
func (c *Conn) send(m Msg, flush bool) sent {
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return sent{err: err}
	}
	var cl *call
	if n := len(c.free); n > 0 {
		cl, c.free = c.free[n-1], c.free[:n-1]
	} else {
		cl = &call{reply: make(chan Msg, 1)}
	}
	cl.op, cl.id = m.Op, m.ID
	c.seq++
	m.Seq = c.seq
	c.pending[m.Seq] = cl
	c.mu.Unlock()
	if err := c.write(&m, flush); err != nil {
		return sent{err: err}
	}
	return sent{cl: cl, seq: m.Seq}
}

// sendUnlessDone is send, unless ctx has ended already: a request whose
// caller gave up before it started is not sent, so it changes nothing in
// the node.
func (c *Conn) sendUnlessDone(ctx context.Context, m Msg, flush bool) sent {
	if err := ctx.Err(); err != nil {
		return sent{err: err}
	}
	return c.send(m, flush)
}

// request sends m, unless ctx has ended, and waits for its reply (see
// await).
func (c *Conn) request(ctx context.Context, m Msg) (Msg, error) {
	return c.await(ctx, c.sendUnlessDone(ctx, m, true), false)
}

// await waits for the reply to s, the end of the connection, ctx, or
// (with noWait) a store event. A reply that has come by the time it gives
// up is returned: the node did what it was asked, and an error would hide
// it. Otherwise the request leaves pending and its reply, if the node still
// sends one, is dropped, except an IncRef's: the reference the node may
// still grant is given back when it is.
func (c *Conn) await(ctx context.Context, s sent, noWait bool) (Msg, error) {
	if s.err != nil {
		return Msg{}, s.err
	}
	var waiting chan struct{}
	if noWait {
		waiting = c.waiting
	}
	var gaveUp error
	for gaveUp == nil {
		// The usual ways first, without a select on every channel: the
		// reply has come, or nobody reads and this caller does.
		select {
		case r := <-s.cl.reply:
			c.recycle(s.cl)
			return r, ErrorOf(&r)
		case <-c.done:
			return c.ended(s.cl)
		default:
		}
		select {
		case <-c.turn:
			gaveUp = c.readFor(ctx, s.cl, waiting)
			continue
		default:
		}
		select {
		case r := <-s.cl.reply:
			c.recycle(s.cl)
			return r, ErrorOf(&r)
		case <-c.done:
			return c.ended(s.cl)
		case <-waiting:
			gaveUp = ErrWaiting
		case <-ctx.Done():
			gaveUp = ctx.Err()
		case <-c.turn:
			gaveUp = c.readFor(ctx, s.cl, waiting)
		}
	}
	if s.cl.op != OpIncRef {
		c.mu.Lock()
		delete(c.pending, s.seq) // from here on no reply comes (replied)
		c.mu.Unlock()
	}
	select {
	case r := <-s.cl.reply:
		return r, ErrorOf(&r)
	default:
	}
	if s.cl.op == OpIncRef {
		go c.giveBack(s.cl)
	}
	return Msg{}, gaveUp
}

// ended is await's answer once the connection has ended: the reply, if
// it came before, else why the connection ended.
func (c *Conn) ended(cl *call) (Msg, error) {
	select {
	case r := <-cl.reply:
		return r, ErrorOf(&r)
	default:
	}
	return Msg{}, c.Err()
}

// giveBack waits for the answer to an IncRef whose caller gave up, and
// releases the reference if the node granted it: a reference nobody knows
// of would pin the package until the connection ends.
func (c *Conn) giveBack(cl *call) {
	select {
	case r := <-cl.reply:
		if r.OK {
			c.request(context.Background(), Msg{Op: OpDecRef, ID: cl.id}) //nolint:errcheck // Close releases it anyway
		}
	case <-c.done:
	}
}
