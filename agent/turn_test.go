package agent_test

import (
	"bufio"
	"context"
	"errors"
	"net"
	"os"
	"testing"

	"github.com/granary-build/granary/agent"
)

// fakeNode serves one connection on a state directory's socket: it
// answers the handshake and bye, and hands every other request to the
// test.
type fakeNode struct {
	state string
	reqs  chan agent.Msg
	conn  chan net.Conn // the accepted connection, once the handshake is answered
}

func newFakeNode(t *testing.T) *fakeNode {
	t.Helper()
	state, err := os.MkdirTemp("", "ag") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(state) })
	ln, err := net.Listen("unix", agent.SocketPath(state))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	f := &fakeNode{state: state, reqs: make(chan agent.Msg, 16), conn: make(chan net.Conn, 1)}
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		rd := bufio.NewReader(c)
		for first := true; ; first = false {
			line, err := rd.ReadBytes('\n')
			if err != nil {
				close(f.reqs)
				return
			}
			var m agent.Msg
			if err := agent.Decode(line, &m); err != nil {
				t.Errorf("fake node: %v", err)
				return
			}
			switch {
			case first:
				f.send(t, c, agent.Msg{Op: agent.OpReply, Seq: m.Seq, OK: true, Hello: &agent.Hello{Version: agent.Version, Host: "fake"}})
				f.conn <- c
			case m.Op == agent.OpBye:
				f.send(t, c, agent.Msg{Op: agent.OpReply, Seq: m.Seq, OK: true})
			default:
				f.reqs <- m
			}
		}
	}()
	return f
}

func (f *fakeNode) send(t *testing.T, c net.Conn, m agent.Msg) {
	if _, err := c.Write(agent.AppendMsg(nil, &m)); err != nil {
		t.Errorf("fake node: %v", err)
	}
}

// connect connects to f and returns the Conn and the node's side.
func (f *fakeNode) connect(t *testing.T) (*agent.Conn, net.Conn) {
	t.Helper()
	c, err := agent.Connect(context.Background(), f.state)
	if err != nil {
		t.Fatal(err)
	}
	return c, <-f.conn
}

// A caller that reads the socket itself for its reply (nobody else
// does) learns that the node went away while it waited: it returns
// ErrNodeGone, and Done is closed.
func TestCallerReadingSeesNodeGo(t *testing.T) {
	f := newFakeNode(t)
	c, nc := f.connect(t)
	defer c.Close()
	go func() {
		<-f.reqs // the IncRef, never answered
		nc.Close()
	}()
	err := c.Handle("p").IncRefContext(context.Background())
	if !errors.Is(err, agent.ErrNodeGone) {
		t.Errorf("IncRef while the node went away = %v, want ErrNodeGone", err)
	}
	<-c.Done()
}

// A caller reading for its reply gives up when its context ends (its
// read is interrupted); the IncRef the node grants afterwards, read by
// the idle watcher since no caller waits, is given back with a DecRef.
func TestCallerReadingGivesUp(t *testing.T) {
	f := newFakeNode(t)
	c, nc := f.connect(t)
	defer c.Close()
	ctx, cancel := context.WithCancel(context.Background())
	got := make(chan agent.Msg, 1)
	go func() {
		m := <-f.reqs
		got <- m
		cancel()
	}()
	err := c.Handle("p").IncRefContext(ctx)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("IncRef whose context ended = %v, want context.Canceled", err)
	}
	inc := <-got
	f.send(t, nc, agent.Msg{Op: agent.OpReply, Seq: inc.Seq, OK: true}) // granted late
	dec := <-f.reqs
	if dec.Op != agent.OpDecRef || dec.ID != "p" {
		t.Fatalf("after a late grant the node got %+v, want a decref of p", dec)
	}
	f.send(t, nc, agent.Msg{Op: agent.OpReply, Seq: dec.Seq, OK: true})
	// The connection still works, its caller reading again.
	go func() {
		m := <-f.reqs
		f.send(t, nc, agent.Msg{Op: agent.OpReply, Seq: m.Seq, OK: true})
	}()
	if err := c.Handle("q").IncRefContext(context.Background()); err != nil {
		t.Errorf("IncRef after the give-up: %v", err)
	}
}

// What the node says unasked reaches an idle connection (no caller
// reads): the idle watcher reads it.
func TestIdleConnGetsNotices(t *testing.T) {
	f := newFakeNode(t)
	c, nc := f.connect(t)
	defer c.Close()
	f.send(t, nc, agent.Msg{Op: agent.OpRefLost, ID: "p", Err: "gone"})
	n := <-c.Notices()
	if n.Kind != agent.NoticeRefLost || n.ID != "p" {
		t.Errorf("notice %+v, want ref-lost of p", n)
	}
	nc.Close()
	<-c.Done()
	if !errors.Is(c.Err(), agent.ErrNodeGone) {
		t.Errorf("Err = %v, want ErrNodeGone", c.Err())
	}
}

// Many callers on one Conn: whoever holds the turn reads for the others.
func TestCallersShareTheTurn(t *testing.T) {
	f := newFakeNode(t)
	c, nc := f.connect(t)
	defer c.Close()
	go func() {
		for m := range f.reqs {
			f.send(t, nc, agent.Msg{Op: agent.OpReply, Seq: m.Seq, OK: true})
		}
	}()
	const callers, pairs = 8, 200
	errs := make(chan error, callers)
	for range callers {
		go func() {
			h := c.Handle("p")
			for range pairs {
				if err := h.IncRefContext(context.Background()); err != nil {
					errs <- err
					return
				}
				if err := h.DecRefContext(context.Background()); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range callers {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}
