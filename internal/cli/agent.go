package cli

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/jobrun"
	"github.com/granary-build/granary/node"
)

// EnvAgent set to "off" makes `build` and `run` use a store of their own
// (their own etcd client and lease) even when a local node serves their
// configuration.
const EnvAgent = jobrun.EnvAgent

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
func (e *env) agentFor(ctx context.Context, cfg node.Config, purpose string, forBuild bool) (*agent.Conn, error) {
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
	c, err := agent.ConnectWith(ctx, cfg.StateDir, agent.Options{Purpose: purpose})
	if errors.Is(err, agent.ErrNoLocalNode) {
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
func (e *env) buildViaAgent(ctx context.Context, c *agent.Conn, id string, needs, argv []string) error {
	h := agentBuilder{c.Handle(id)}
	prog := newProgress(e.stderr, id, isTerminal(e.stderr))
	defer prog.stop()
	var cacheEvents eventLog
	c.OnEvent(func(wev agent.Event) {
		ev := node.StoreEvent(wev)
		prog.event(ev)
		if ev.ID == id {
			cacheEvents.add(ev)
		}
	})
	out, ran, err := e.buildWith(ctx, h, id, needs, argv, prog)
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
// back within jobrun.ReconnectWithin, it stops its command and says why
// (jobrun.Job.Run, shared with cmd/granary-run).
func (e *env) runViaAgent(ctx context.Context, cfg node.Config, c *agent.Conn, id string, argv []string) error {
	// IncRef waits for a build in progress: show what it waits for.
	prog := newProgress(e.stderr, id, isTerminal(e.stderr))
	c.OnEvent(func(ev agent.Event) {
		if ev.Kind == agent.EventWaiting {
			prog.event(node.StoreEvent(ev))
		}
	})
	err := c.Handle(id).IncRefContext(ctx)
	prog.stop()
	c.OnEvent(nil)
	if err != nil {
		c.Close()
		if errors.Is(err, core.ErrPackageNotExist) {
			return jobrun.NotAvailable(id, err)
		}
		return err
	}
	j := &jobrun.Job{
		ID: id, Argv: argv, Pkg: c.Handle(id).OutputDirectory(),
		Stdin: e.stdin, Stdout: e.stdout, Stderr: e.stderr,
		Hold: func(ctx context.Context) (jobrun.Ref, error) {
			c, err := e.agentFor(ctx, cfg, "granary run "+argv[0], false)
			if err == nil && c == nil {
				err = agent.ErrNoLocalNode
			}
			if err != nil {
				return nil, err
			}
			if err := c.Handle(id).IncRefContext(ctx); err != nil {
				c.Close()
				return nil, err
			}
			return c, nil
		},
	}
	return j.Run(ctx, c)
}

// localHolders lists the local holders of id that the local node knows,
// or nil when no node serves cfg.
func (e *env) localHolders(ctx context.Context, cfg node.Config, id string) []agent.Holder {
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
func printHolders(e *env, hs []agent.Holder) {
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

// agentBuilder is a package of the local node as `build` needs it: its
// outcome and errors in etcdstore's terms, as a store's handle gives them.
type agentBuilder struct{ h *agent.Handle }

func (b agentBuilder) OutputDirectory() string  { return b.h.OutputDirectory() }
func (b agentBuilder) LoggingDirectory() string { return b.h.LoggingDirectory() }

func (b agentBuilder) BuildNeedsOutcome(ctx context.Context, needs []string, builder func(context.Context) error) (etcdstore.Outcome, error) {
	out, err := b.h.BuildNeedsOutcome(ctx, needs, builder)
	if err != nil {
		return etcdstore.Outcome{}, node.StoreError(err)
	}
	return node.StoreOutcome(out), nil
}
