package bench

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// socketFloor measures the physical floor of a pair through the host
// agent on this machine: two round trips of one short line each over a
// unix socket, between goroutines of this process (an echo server and c
// callers with a connection each), with no work on either side. A pair
// through the agent does the same I/O plus the protocol and the reference
// counting, so the ratio of the two is the agent's own cost.
func (r *run) socketFloor(ctx context.Context, c, n int) (rate float64, p50 time.Duration, err error) {
	dir, err := os.MkdirTemp("", "gf")
	if err != nil {
		return 0, 0, err
	}
	defer os.RemoveAll(dir)
	ln, err := net.Listen("unix", filepath.Join(dir, "echo.sock"))
	if err != nil {
		return 0, 0, err
	}
	var served sync.WaitGroup
	defer served.Wait()
	defer ln.Close()
	served.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			served.Go(func() { echo(conn) })
		}
	})
	type peer struct {
		conn net.Conn
		rd   *bufio.Reader
	}
	// A connection is used by one caller at a time (as a process's).
	peers := make(chan peer, c)
	for range c {
		conn, err := net.Dial("unix", ln.Addr().String())
		if err != nil {
			return 0, 0, err
		}
		defer conn.Close()
		peers <- peer{conn, bufio.NewReader(conn)}
	}
	line := []byte(`{"op":"incref","seq":1,"id":"agent-hot"}` + "\n")
	pair := func(ctx context.Context, i int) (time.Duration, error) {
		p := <-peers
		defer func() { peers <- p }()
		t := time.Now()
		for range 2 {
			if _, err := p.conn.Write(line); err != nil {
				return 0, err
			}
			if _, err := p.rd.ReadSlice('\n'); err != nil {
				return 0, err
			}
		}
		return time.Since(t), nil
	}
	wall, lats, err := parallel(ctx, c, n, pair)
	if err != nil {
		return 0, 0, fmt.Errorf("socket floor: %w", err)
	}
	return float64(n) / wall.Seconds(), quantile(lats, 0.5), nil
}

// echo writes back every line it reads until the connection ends.
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
