package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/node"
)

// The agent scenario's servers in processes of their own: the echo floor
// (`granary-bench child` in its echo role) and the node (`granary serve`,
// the binary the scenario times jobs with; without one, `granary-bench
// child` serving node's local API over the run's etcd). Callers and server
// then share no Go runtime, as a host's jobs and its node do not.

// proc is a server running in a child process.
type proc struct {
	what   string
	cmd    *exec.Cmd
	stdin  io.Closer // a child serves until its stdin ends; nil: SIGTERM stops it
	exited chan struct{}
	err    error        // the process's exit, once exited is closed
	out    bytes.Buffer // its stderr (read once exited is closed)
	dir    string       // removed after it exits
}

// startProc starts cmd and polls ready until it succeeds, the process
// exits, or 60 s pass. viaStdin: the process serves until its stdin ends
// (a bench child), else until SIGTERM. dir is removed once it has exited.
func startProc(ctx context.Context, what string, cmd *exec.Cmd, viaStdin bool, dir string, ready func() error) (*proc, error) {
	p := &proc{what: what, cmd: cmd, exited: make(chan struct{}), dir: dir}
	cmd.Stdout, cmd.Stderr = io.Discard, &p.out
	if viaStdin {
		w, err := cmd.StdinPipe()
		if err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
		p.stdin = w
	}
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	go func() { p.err = cmd.Wait(); close(p.exited) }()
	deadline := time.Now().Add(time.Minute)
	for {
		err := ready()
		if err == nil {
			return p, nil
		}
		select {
		case <-p.exited:
			os.RemoveAll(dir)
			return nil, fmt.Errorf("%s exited before it served (%v): %s", what, p.err, strings.TrimSpace(p.out.String()))
		case <-ctx.Done():
			p.stop() //nolint:errcheck // giving up
			return nil, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.stop() //nolint:errcheck // giving up
			return nil, fmt.Errorf("%s did not serve within a minute: %w", what, err)
		}
	}
}

// stop ends the process (its stdin closed, or SIGTERM), kills it if it
// has not exited 10 s later, and removes its directory.
func (p *proc) stop() error {
	if p.stdin != nil {
		p.stdin.Close()
	} else {
		p.cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // it may have exited
	}
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill() //nolint:errcheck // it may have exited
		<-p.exited
	}
	os.RemoveAll(p.dir)
	if p.err != nil && !(p.stdin == nil && killedBy(p.err, syscall.SIGTERM)) {
		return fmt.Errorf("%s: %w: %s", p.what, p.err, strings.TrimSpace(p.out.String()))
	}
	return nil
}

// killedBy reports whether err is the exit of a process killed by sig: a
// program without a handler for the SIGTERM that stop sends dies of it,
// which is the stop asked for.
func killedBy(err error, sig syscall.Signal) bool {
	var xe *exec.ExitError
	if !errors.As(err, &xe) {
		return false
	}
	ws, ok := xe.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == sig
}

// echoProcess serves the echo floor in a child process; nil without a
// way to start one (Config.Child).
func (r *run) echoProcess(ctx context.Context) (path string, p *proc, err error) {
	if r.cfg.Child == nil {
		return "", nil, nil
	}
	dir, err := os.MkdirTemp("", "ge") // short: unix socket paths are limited
	if err != nil {
		return "", nil, err
	}
	path = filepath.Join(dir, "echo.sock")
	cmd := r.cfg.Child(ctx, []string{"echo", r.root, r.prefix, path})
	p, err = startProc(ctx, "the echo floor's child", cmd, true, dir, func() error {
		c, err := net.Dial("unix", path)
		if err == nil {
			c.Close()
		}
		return err
	})
	return path, p, err
}

// nodeProcess runs a node of its own process for the run's root and
// prefix, named host, in a fresh state directory: `granary serve` if the
// run has a granary program (Config.Run), else a bench child serving
// node's local API; nil without either. serve says which it is.
func (r *run) nodeProcess(ctx context.Context, host string) (state string, p *proc, serve bool, err error) {
	if r.cfg.Run == nil && r.cfg.Child == nil {
		return "", nil, false, nil
	}
	state, err = os.MkdirTemp("", "gn") // short: unix socket paths are limited
	if err != nil {
		return "", nil, false, err
	}
	ttl := strconv.Itoa(int(r.z.TTL / time.Second))
	var cmd *exec.Cmd
	what := "the node's child"
	if serve = r.cfg.Run != nil; serve {
		what = "granary serve"
		cmd = r.cfg.Run(ctx, []string{"serve", "--root", r.root, "--state-dir", state, "--prefix", r.prefix,
			"--host", host, "--ttl", ttl, "--gc-interval", "0"}, nil)
	} else {
		cmd = r.cfg.Child(ctx, []string{"node", r.root, r.prefix, state, host, ttl})
	}
	p, err = startProc(ctx, what, cmd, !serve, state, func() error {
		c, err := agent.Connect(ctx, state)
		if err == nil {
			c.Close()
		}
		return err
	})
	return state, p, serve, err
}

// ChildNeedsEtcd reports whether ChildMain's role (its first argument)
// needs an etcd client; the echo floor does not.
func ChildNeedsEtcd(args []string) bool { return len(args) == 0 || args[0] != "echo" }

// childEcho is ChildMain's echo role: the echo floor on the unix socket
// rest[0] until stdin ends.
func childEcho(ctx context.Context, rest []string) error {
	if len(rest) < 1 {
		return errors.New("bench child echo: want SOCKET")
	}
	ln, err := net.Listen("unix", rest[0])
	if err != nil {
		return err
	}
	ctx, cancel := untilStdinEnds(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	serveEcho(ln)
	return nil
}

// childNode is ChildMain's node role: node's local API (as `granary serve`
// runs it: store events wired) for a store on root and prefix, in state
// directory rest[0], as host rest[1] with lease TTL rest[2], until stdin
// ends.
func childNode(ctx context.Context, cli *clientv3.Client, root, prefix string, rest []string) error {
	if len(rest) < 3 {
		return errors.New("bench child node: want STATE HOST TTL")
	}
	ttl, err := strconv.Atoi(rest[2])
	if err != nil {
		return err
	}
	var api atomic.Pointer[node.LocalAPI]
	s, err := etcdstore.New(ctx, cli, root, etcdstore.WithPrefix(prefix), etcdstore.WithHost(rest[1]),
		etcdstore.WithTTL(time.Duration(ttl)*time.Second), etcdstore.WithEvents(func(e etcdstore.Event) {
			if a := api.Load(); a != nil {
				a.Event(e)
			}
		}))
	if err != nil {
		return err
	}
	defer s.Close()
	cfg := node.DefaultConfig()
	cfg.StateDir, cfg.Root, cfg.Prefix, cfg.Name, cfg.TTL = rest[0], root, prefix, rest[1], time.Duration(ttl)*time.Second
	a, err := node.NewLocalAPI(s, cfg, nil)
	if err != nil {
		return err
	}
	api.Store(a)
	ctx, cancel := untilStdinEnds(ctx)
	defer cancel()
	return a.Run(ctx)
}

// untilStdinEnds returns a context that ends when this process's stdin
// does: the bench closes it to stop a serving child (and it ends with the
// bench, however the bench ends).
func untilStdinEnds(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		io.Copy(io.Discard, os.Stdin) //nolint:errcheck // any end will do
		cancel()
	}()
	return ctx, cancel
}
