package bench

import (
	"bufio"
	"context"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// The physical floor of a pair through the host agent on this machine:
// two round trips of one short line each over a unix socket, with no work
// on either side, from c callers with a connection each. A pair through
// the agent does the same I/O plus the protocol and the reference
// counting, so the ratio of the two is the agent's own cost. The echo
// server runs in this process (echoInProcess: server and callers share a
// Go runtime, as an in-process node's do) or in a process of its own
// (ChildMain's echo role: two processes, as a node and its jobs are).

// floorLine is the line of the floor's round trips: an IncRef's size.
var floorLine = []byte(`{"op":"incref","seq":1,"id":"agent-hot"}` + "\n")

// floorOpener returns the connections of a floor measurement against the
// echo server at path: each pair writes the line and reads it back twice.
func floorOpener(path string) opener {
	return func(ctx context.Context) (connPair, func(), error) {
		conn, err := net.Dial("unix", path)
		if err != nil {
			return nil, nil, err
		}
		rd := bufio.NewReader(conn)
		pair := func(context.Context) error {
			for range 2 {
				if _, err := conn.Write(floorLine); err != nil {
					return err
				}
				if _, err := rd.ReadSlice('\n'); err != nil {
					return err
				}
			}
			return nil
		}
		return pair, func() { conn.Close() }, nil
	}
}

// echoInProcess serves the echo floor in this process on a socket in a
// fresh temporary directory; stop ends it and removes the directory.
func echoInProcess() (path string, stop func(), err error) {
	dir, err := os.MkdirTemp("", "gf") // short: unix socket paths are limited
	if err != nil {
		return "", nil, err
	}
	path = filepath.Join(dir, "echo.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		os.RemoveAll(dir)
		return "", nil, err
	}
	done := make(chan struct{})
	go func() { serveEcho(ln); close(done) }()
	return path, func() { ln.Close(); <-done; os.RemoveAll(dir) }, nil
}

// serveEcho accepts connections on ln and echoes each until ln is closed,
// then waits for the connections to end (their callers close them).
func serveEcho(ln net.Listener) {
	var served sync.WaitGroup
	defer served.Wait()
	for {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		served.Go(func() { echo(conn) })
	}
}

// echo writes back every line it reads until the connection ends: what a
// node does for a warm request, without the work.
func echo(conn net.Conn) {
	defer conn.Close()
	rd := bufio.NewReader(conn)
	for {
		l, err := rd.ReadSlice('\n')
		if err != nil {
			return // the caller closed its end
		}
		if _, err := conn.Write(l); err != nil {
			return
		}
	}
}

// connPair is one timed pair on one connection.
type connPair func(ctx context.Context) error

// opener opens one caller's connection for a pair measurement: its pair
// and its close.
type opener func(ctx context.Context) (connPair, func(), error)

// pairs runs n pairs from c callers, each on a connection of its own that
// open made (a connection is used by one caller at a time, as a
// process's), and returns the wall time and each pair's latency.
func pairs(ctx context.Context, c, n int, open opener) (time.Duration, []time.Duration, error) {
	free := make(chan connPair, c)
	var closers []func()
	defer func() {
		for _, cl := range closers {
			cl()
		}
	}()
	for range c {
		p, cl, err := open(ctx)
		if err != nil {
			return 0, nil, err
		}
		closers = append(closers, cl)
		free <- p
	}
	return parallel(ctx, c, n, func(ctx context.Context, _ int) (time.Duration, error) {
		p := <-free
		defer func() { free <- p }()
		t := time.Now()
		err := p(ctx)
		return time.Since(t), err
	})
}
