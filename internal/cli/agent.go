package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/node"
)

// EnvAgent set to "off" makes `build` and `run` use a store of their own
// (their own etcd client and lease) even when a local node serves their
// configuration.
const EnvAgent = "GRANARY_AGENT"

// reconnectWithin bounds how long `run` tries to reach a restarted local
// node before it stops its command.
const reconnectWithin = 30 * time.Second

// agentFor returns a connection to the local node that serves cfg (same
// state directory, shared root and prefix), starting the embedded node
// first when there are no endpoints, as connect does. It returns nil, nil
// when the command must use a direct store instead:
//
//   - $GRANARY_AGENT=off;
//   - with endpoints, no node serves the state directory (`granary serve`
//     is not running on this host);
//   - the node serves another root or prefix than cfg names;
//   - for builds, a remote cache is configured on the command line (the
//     node's own cache configuration would be used instead).
func (e *env) agentFor(ctx context.Context, cfg node.Config, purpose string, forBuild bool) (*node.Conn, error) {
	if e.getenv(EnvAgent) == "off" || (forBuild && cfg.Cache != "") {
		return nil, nil
	}
	if err := cfg.Validate(); err != nil {
		return nil, &ExitErr{Code: ExitUsage, Err: err}
	}
	if cfg.Embedded() {
		if err := e.ensureLocalNode(ctx, cfg); err != nil {
			return nil, err
		}
	}
	c, err := node.ConnectWith(ctx, cfg.StateDir, node.ConnectOptions{Purpose: purpose})
	if errors.Is(err, node.ErrNoLocalNode) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	root, _ := filepath.Abs(cfg.Root)
	if c.Root() != root || c.Prefix() != cfg.Prefix {
		c.Close()
		return nil, nil
	}
	return c, nil
}

// buildViaAgent is `build` through the local node: one attempt per ID for
// every caller on the host, the builder run here.
func (e *env) buildViaAgent(ctx context.Context, c *node.Conn, id string, argv []string) error {
	h := c.Handle(id)
	prog := newProgress(e.stderr, id, isTerminal(e.stderr))
	defer prog.stop()
	var cacheEvents eventLog
	c.OnEvent(func(ev etcdstore.Event) {
		prog.event(ev)
		if ev.ID == id {
			cacheEvents.add(ev)
		}
	})
	out, ran, err := e.buildWith(ctx, h, id, argv, prog)
	if err != nil {
		return err
	}
	e.reportBuilt(id, out, ran, &cacheEvents, "the local node's remote cache")
	return nil
}

// runViaAgent is `run` through the local node: the reference lives in the
// node as long as this process's connection. If the node goes away, run
// reconnects (starting the embedded node again, if it is one) and takes
// its reference again; if the package is gone by then, or no node comes
// back within reconnectWithin, it stops its command and says why.
func (e *env) runViaAgent(ctx context.Context, cfg node.Config, c *node.Conn, id string, argv []string) error {
	defer func() { c.Close() }()
	// IncRef waits for a build in progress: show what it waits for.
	prog := newProgress(e.stderr, id, isTerminal(e.stderr))
	c.OnEvent(func(ev etcdstore.Event) {
		if ev.Kind == etcdstore.EventWaiting {
			prog.event(ev)
		}
	})
	err := c.Handle(id).IncRefContext(ctx)
	prog.stop()
	c.OnEvent(nil)
	if err != nil {
		if errors.Is(err, core.ErrPackageNotExist) {
			return &ExitErr{Code: ExitNotExist, Err: fmt.Errorf("granary: package %q does not exist (and no build of it is in progress); build it first: granary build %s -- CMD", id, id)}
		}
		return err
	}

	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, forwarded...)
	defer signal.Stop(sigs)

	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), EnvPkg+"="+c.Handle(id).OutputDirectory())
	cmd.Stdin, cmd.Stdout, cmd.Stderr = e.stdin, e.stdout, e.stderr
	if err := cmd.Start(); err != nil {
		return &ExitErr{Code: 127, Err: fmt.Errorf("granary: run %s: %w", argv[0], err)}
	}
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()

	var stopped error // why the command was stopped
	var kill <-chan time.Time
	stop := func(why error) {
		if stopped != nil {
			return
		}
		stopped = why
		fmt.Fprintf(e.stderr, "granary: %v: stopping %s\n", why, argv[0])
		cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // it may have exited
		kill = time.After(10 * time.Second)
	}
	reconnected := make(chan reconnectResult, 1)
	reconnecting := false
	rctx, rcancel := context.WithCancel(ctx)
	defer rcancel()
	for {
		var done <-chan struct{}
		var notices <-chan node.Notice
		if !reconnecting && stopped == nil {
			done, notices = c.Done(), c.Notices()
		}
		select {
		case s := <-sigs:
			cmd.Process.Signal(s) //nolint:errcheck
		case n := <-notices:
			if n.Kind == node.NoticeRefLost && n.ID == id {
				stop(fmt.Errorf("the reference to %s was lost (%v); the package may be gone", id, n.Err))
			}
		case <-done:
			reconnecting = true
			fmt.Fprintf(e.stderr, "granary: the local node went away (%v); reconnecting\n", c.Err())
			go func() { reconnected <- e.reconnect(rctx, cfg, id, argv[0]) }()
		case r := <-reconnected:
			reconnecting = false
			if r.err != nil {
				stop(r.err)
				continue
			}
			c = r.c
			fmt.Fprintf(e.stderr, "granary: reconnected to the local node (pid %d); holding %s again\n", c.NodePID(), id)
		case <-kill:
			cmd.Process.Kill() //nolint:errcheck
		case err := <-waited:
			if reconnecting {
				rcancel()
				if r := <-reconnected; r.c != nil {
					c = r.c
				}
			}
			if stopped != nil {
				return &ExitErr{Code: ExitError, Err: fmt.Errorf("granary: %s stopped: %w", argv[0], stopped)}
			}
			return childExit(err)
		}
	}
}

type reconnectResult struct {
	c   *node.Conn
	err error
}

// reconnect reaches the local node again and takes the reference to id
// again, for at most reconnectWithin.
func (e *env) reconnect(ctx context.Context, cfg node.Config, id, prog string) reconnectResult {
	ctx, cancel := context.WithTimeout(ctx, reconnectWithin)
	defer cancel()
	var last error
	for wait := 50 * time.Millisecond; ; wait = min(2*wait, 2*time.Second) {
		c, err := e.agentFor(ctx, cfg, "granary run "+prog, false)
		if err == nil && c == nil {
			err = node.ErrNoLocalNode
		}
		if err == nil {
			err = c.Handle(id).IncRefContext(ctx)
			if err == nil {
				return reconnectResult{c: c}
			}
			c.Close()
			if errors.Is(err, core.ErrPackageNotExist) {
				return reconnectResult{err: fmt.Errorf("the package %s is gone: it was removed while the local node was away", id)}
			}
		}
		last = err
		select {
		case <-ctx.Done():
			return reconnectResult{err: fmt.Errorf("the local node did not come back within %v (%v)", reconnectWithin, last)}
		case <-time.After(wait):
		}
	}
}

// localHolders lists the local holders of id that the local node knows,
// or nil when no node serves cfg.
func (e *env) localHolders(ctx context.Context, cfg node.Config, id string) []node.Holder {
	c, err := e.agentFor(ctx, cfg, "granary inspect", false)
	if err != nil || c == nil {
		return nil
	}
	defer c.Close()
	_, hs, err := c.Inspect(ctx, id)
	if err != nil {
		return nil
	}
	return hs
}

// printHolders shows the local holders of a package (nil: no node).
func printHolders(e *env, hs []node.Holder) {
	if hs == nil {
		return
	}
	fmt.Fprintf(e.stdout, "local holders: %d\n", len(hs))
	for _, h := range hs {
		fmt.Fprintf(e.stdout, "  - uid %d pid %d since %s", h.UID, h.PID, h.Since.Format(time.RFC3339))
		if h.Purpose != "" {
			fmt.Fprintf(e.stdout, ": %s", h.Purpose)
		}
		fmt.Fprintln(e.stdout)
	}
}

// tryRemove removes id through the local node when one serves cfg (a
// reference the node only keeps for its linger does not block it), else
// through the command's own store.
func (e *env) tryRemove(ctx context.Context, cfg node.Config, c *conn, id string) (bool, error) {
	if ac, err := e.agentFor(ctx, cfg, "granary rm", false); err == nil && ac != nil {
		defer ac.Close()
		return ac.Handle(id).TryRemoveContext(ctx)
	}
	return c.store.Handle(id).TryRemoveContext(ctx)
}
