package agentwire

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/granary-build/granary/core"
)

// ErrWaiting is returned by DialHold when the node reports that the
// reference waits for a build in progress (it sent a store event): the
// light client shows no waiting line, so its caller hands the job to the
// full CLI instead.
var ErrWaiting = errors.New("granary: the reference waits for a build in progress")

// Error is an error the node answered with: its message and the names of
// the sentinels it wraps (Code*). Those of core's sentinels unwrap to
// them, so errors.Is(err, core.ErrPackageNotExist) works.
type Error struct {
	Msg   string
	Codes []string
}

func (e *Error) Error() string { return e.Msg }

// Unwrap returns core's sentinels named by Codes.
func (e *Error) Unwrap() []error {
	var out []error
	for _, c := range e.Codes {
		switch c {
		case CodeInvalid:
			out = append(out, core.ErrInvalidID)
		case CodeNotExist:
			out = append(out, core.ErrPackageNotExist)
		case CodeBuildFailed:
			out = append(out, core.ErrBuildFailed)
		}
	}
	return out
}

// Client is a light connection to the local node, enough for a job: the
// handshake, one reference, notices. (The full client, with builds, events
// and inspection, is node.Conn.) The node holds the references a Client
// takes until DecRef, Close or the connection's end. It is safe for
// concurrent use.
type Client struct {
	c     *os.File // the connected socket
	hello Hello

	wmu sync.Mutex
	bw  *bufio.Writer
	buf []byte // the message being written

	mu      sync.Mutex
	seq     uint64
	pending map[uint64]chan Msg
	err     error

	waiting chan struct{} // a store event arrived (a reference waits for a build)
	done    chan struct{}
	readerr chan struct{}
	notices chan Notice
}

// DialHold connects to the node listening on socket (paths.Socket of its
// state directory), shakes hands giving purpose for its references, and
// takes a reference to id, held by the node for this connection; the
// handshake and the IncRef are sent at once, so that both take one round
// trip. err (wrapping ErrNodeGone if no node answers) is the connection's;
// incref is the IncRef's: an error wrapping core.ErrPackageNotExist if the
// package is not available, or, with noWait, ErrWaiting as soon as the
// node reports that the reference waits for a build in progress (without
// noWait, it waits for the build). The reference comes from whichever node
// serves socket: check Hello before using it. Close releases it.
func DialHold(ctx context.Context, socket, purpose, id string, noWait bool) (c *Client, incref, err error) {
	if c, err = dial(socket); err != nil {
		return nil, nil, err
	}
	hello := c.sendHello(purpose)
	inc, incref := c.send(Msg{Op: OpIncRef, ID: id}, true)
	if err := c.hello1(ctx, hello); err != nil {
		return nil, nil, err
	}
	if incref == nil {
		_, incref = c.await(ctx, inc, noWait)
	}
	return c, incref, nil
}

// dial connects to socket and starts the reader.
func dial(socket string) (*Client, error) {
	f, err := dialUnix(socket)
	if err != nil {
		return nil, fmt.Errorf("%w (socket %s: %v)", ErrNodeGone, socket, err)
	}
	c := &Client{
		c: f, bw: bufio.NewWriter(f), pending: make(map[uint64]chan Msg),
		waiting: make(chan struct{}, 1), done: make(chan struct{}), readerr: make(chan struct{}),
		notices: make(chan Notice, 16),
	}
	go c.read()
	return c, nil
}

// sent is a request sent: where its reply comes, or why it was not sent.
type sent struct {
	ch  chan Msg
	err error
}

// sendHello buffers the handshake; the next message sent flushes it.
func (c *Client) sendHello(purpose string) sent {
	ch, err := c.send(Msg{Op: OpHello, Purpose: purpose}, false) // flushed with the IncRef
	return sent{ch, err}
}

// hello1 waits for the handshake's answer; on failure it closes c.
func (c *Client) hello1(ctx context.Context, s sent) error {
	err := s.err
	var r Msg
	if err == nil {
		r, err = c.await(ctx, s.ch, false)
	}
	if err == nil && r.Hello == nil {
		err = errors.New("no handshake")
	}
	if err != nil {
		c.Close()
		return fmt.Errorf("granary: handshake with the local node (%s): %w", c.c.Name(), err)
	}
	c.hello = *r.Hello
	return nil
}

// dialUnix connects to a unix stream socket with syscalls, not package
// net: net's cgo DNS resolver would make the binary dynamically linked,
// and loading libc costs more than everything else granary-run does. A
// unix socket's connect does not block for long (it fails at once when
// nobody listens), so it takes no context. The file is non-blocking, so
// its reads go through the runtime's poller and Close interrupts them.
func dialUnix(path string) (*os.File, error) {
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	for {
		err = syscall.Connect(fd, &syscall.SockaddrUnix{Name: path})
		if err != syscall.EINTR {
			break
		}
	}
	if err == nil {
		err = syscall.SetNonblock(fd, true)
	}
	if err != nil {
		syscall.Close(fd)
		return nil, os.NewSyscallError("connect", err)
	}
	return os.NewFile(uintptr(fd), path), nil
}

// Hello is what the node said of itself in the handshake.
func (c *Client) Hello() Hello { return c.hello }

// NodePID is the node's process ID.
func (c *Client) NodePID() int { return c.hello.PID }

// Done is closed when the connection has ended; Err then says why.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err is nil while the connection is open, then why it ended (wrapping
// ErrNodeGone).
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Notices delivers what the node reports unasked, and NoticeNodeGone when
// the connection ends. Notices that find the channel full (16) are
// dropped; Done is never missed.
func (c *Client) Notices() <-chan Notice { return c.notices }

// Close says bye (the node releases every reference of this connection
// before it answers; at most 10 s are spent waiting) and closes the
// connection.
func (c *Client) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	c.request(ctx, Msg{Op: OpBye}, false) //nolint:errcheck // closing either way
	cancel()
	c.end(fmt.Errorf("%w: closed", ErrNodeGone))
	<-c.readerr
	return nil
}

// end records why the connection ends and closes it; the first call wins.
func (c *Client) end(why error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = why
	c.pending = map[uint64]chan Msg{}
	c.mu.Unlock()
	c.c.Close()
	close(c.done)
	c.notify(Notice{Kind: NoticeNodeGone, Err: why})
}

func (c *Client) notify(n Notice) {
	select {
	case c.notices <- n:
	default:
	}
}

// read dispatches the node's messages until the connection ends.
func (c *Client) read() {
	defer close(c.readerr)
	lr := NewLineReader(c.c)
	for {
		var m Msg
		line, err := lr.Next()
		if err == nil {
			err = Decode(line, &m)
		}
		if err != nil {
			c.end(fmt.Errorf("%w: %v", ErrNodeGone, err))
			return
		}
		switch m.Op {
		case OpReply:
			c.mu.Lock()
			ch := c.pending[m.Seq]
			delete(c.pending, m.Seq)
			c.mu.Unlock()
			if ch != nil {
				ch <- m
			}
		case OpEvent:
			select {
			case c.waiting <- struct{}{}:
			default:
			}
		default:
			if n, ok := NoticeOf(m); ok {
				c.notify(n)
			}
		}
	}
}

// request sends m with a new sequence number and waits for the reply, the
// end of the connection, ctx, or (with noWait) a store event.
func (c *Client) request(ctx context.Context, m Msg, noWait bool) (Msg, error) {
	ch, err := c.send(m, true)
	if err != nil {
		return Msg{}, err
	}
	return c.await(ctx, ch, noWait)
}

// send sends m with a new sequence number; the reply will come on the
// channel it returns. Without flush, m waits in the buffer for the next
// message sent with it.
func (c *Client) send(m Msg, flush bool) (chan Msg, error) {
	ch := make(chan Msg, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, err
	}
	c.seq++
	m.Seq = c.seq
	c.pending[m.Seq] = ch
	c.mu.Unlock()
	c.wmu.Lock()
	c.buf = AppendMsg(c.buf[:0], &m)
	_, err := c.bw.Write(c.buf)
	if err == nil && flush {
		err = c.bw.Flush()
	}
	c.wmu.Unlock()
	if err != nil {
		err = fmt.Errorf("%w: %v", ErrNodeGone, err)
		c.end(err)
		return nil, err
	}
	return ch, nil
}

// await waits for the reply on ch (from send), the end of the connection,
// ctx, or (with noWait) a store event.
func (c *Client) await(ctx context.Context, ch chan Msg, noWait bool) (Msg, error) {
	var waiting chan struct{}
	if noWait {
		waiting = c.waiting
	}
	select {
	case r := <-ch:
		return r, replyErr(r)
	case <-c.done:
		select {
		case r := <-ch:
			return r, replyErr(r)
		default:
		}
		return Msg{}, c.Err()
	case <-waiting:
		return Msg{}, ErrWaiting
	case <-ctx.Done():
		return Msg{}, ctx.Err()
	}
}

func replyErr(m Msg) error {
	if m.Err == "" && len(m.Codes) == 0 {
		return nil
	}
	return &Error{Msg: m.Err, Codes: m.Codes}
}
