package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
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
// Done is closed, and a Notice sent, when the node goes away.
type Conn struct {
	f     *os.File // the connected socket
	hello Hello

	wmu sync.Mutex
	bw  *bufio.Writer
	buf []byte // the message being written

	mu      sync.Mutex
	seq     uint64
	pending map[uint64]*call
	builds  map[uint64]*clientBuild
	err     error          // why the connection ended
	events  func(Event)    // set by OnEvent
	held    map[string]int // references this Conn holds, by package
	waiting chan struct{}  // an event arrived: a request waits for a build
	done    chan struct{}  // closed when the connection ends
	readerr chan struct{}  // closed when the reader has returned
	notices chan Notice    // what the node said unasked
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

// dial connects to stateDir's socket and starts the reader.
func dial(stateDir string) (*Conn, error) {
	path := SocketPath(stateDir)
	f, err := dialUnix(path)
	if err != nil {
		return nil, fmt.Errorf("%w (socket %s: %v)", ErrNoLocalNode, path, err)
	}
	c := &Conn{
		f: f, bw: bufio.NewWriter(f),
		pending: make(map[uint64]*call), builds: make(map[uint64]*clientBuild), held: make(map[string]int),
		waiting: make(chan struct{}, 1), done: make(chan struct{}), readerr: make(chan struct{}),
		notices: make(chan Notice, 16),
	}
	go c.read()
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
		return fmt.Errorf("granary: handshake with the local node (%s): %w", c.f.Name(), err)
	}
	c.hello = *r.Hello
	return nil
}

// OnEvent makes fn receive the node store's events (waiting on another
// host's attempt, lock delay, failure, cache, publish) about packages this
// Conn is building or waiting for in IncRef. fn runs on the connection's
// reader and must not block; nil stops them.
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
	<-c.readerr
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

// read dispatches the node's messages until the connection ends.
func (c *Conn) read() {
	defer close(c.readerr)
	lr := NewLineReader(c.f)
	for {
		var m Msg
		line, err := lr.Next()
		if err == nil {
			err = Decode(line, &m)
		}
		if err != nil {
			c.end(nodeGone(err.Error()))
			return
		}
		switch m.Op {
		case OpReply:
			c.replied(m)
		case OpBuildNow:
			c.runBuilder(m.Seq)
		case OpBuildStop:
			c.stopBuilder(m.Seq)
		case OpEvent:
			c.event(m.Event)
		default:
			if n, ok := noticeOf(&m); ok {
				c.notify(n)
			}
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
	cl := &call{op: m.Op, id: m.ID, reply: make(chan Msg, 1)}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return sent{err: err}
	}
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
	select {
	case r := <-s.cl.reply:
		return r, ErrorOf(&r)
	case <-c.done:
		select {
		case r := <-s.cl.reply:
			return r, ErrorOf(&r)
		default:
		}
		return Msg{}, c.Err()
	case <-waiting:
		gaveUp = ErrWaiting
	case <-ctx.Done():
		gaveUp = ctx.Err()
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
