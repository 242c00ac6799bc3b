package cli

import (
	"context"
	"errors"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/jobrun"
)

// cmdRun runs a command holding a reference to a package: through the
// local node when one serves the configuration, else with a store of its
// own. Both go through jobrun's loop (signals, lost reference, exit code).
func cmdRun(ctx context.Context, e *env, args []string) error {
	f, err := e.newFlags("run", false)
	if err != nil {
		return err
	}
	id, argv, err := e.parseIDCmd(f, args)
	if err != nil {
		return err
	}
	if ac, err := e.agentFor(ctx, f.cfg, "granary run "+argv[0], false); err != nil {
		return err
	} else if ac != nil {
		return e.runViaAgent(ctx, f.cfg, ac, id, argv)
	}
	r, err := e.holdDirect(ctx, f, id, argv[0])
	if err != nil {
		return err
	}
	j := &jobrun.Job{ID: id, Argv: argv, Pkg: r.h.OutputDirectory(), Stdin: e.stdin, Stdout: e.stdout, Stderr: e.stderr}
	return j.Run(ctx, r)
}

// holdDirect takes the reference to id with a store of the command's own,
// showing what IncRef waits for (a build in progress).
func (e *env) holdDirect(ctx context.Context, f *flags, id, prog string) (*directRef, error) {
	r := &directRef{notices: make(chan agent.Notice, 1)}
	p := newProgress(e.stderr, id, isTerminal(e.stderr))
	defer p.stop()
	c, err := e.connect(ctx, f.cfg, etcdstore.WithPurpose("granary run "+prog),
		etcdstore.WithEvents(func(ev etcdstore.Event) { r.event(p, id, ev) }))
	if err != nil {
		return nil, err
	}
	r.c, r.h = c, c.store.Handle(id)
	err = r.h.IncRefContext(ctx)
	p.stop()
	if err != nil {
		c.Close()
		if errors.Is(err, core.ErrPackageNotExist) {
			return nil, jobrun.NotAvailable(id, err)
		}
		return nil, err
	}
	return r, nil
}

// directRef is a job's reference held by the command's own store, as
// jobrun sees it: a connection that never goes away (the lease is the
// store's), whose lost reference is a notice.
type directRef struct {
	c       *conn
	h       *etcdstore.Handle
	notices chan agent.Notice
}

// event shows the waits of IncRef and turns a lost reference into a notice.
func (r *directRef) event(p *progress, id string, ev etcdstore.Event) {
	switch {
	case ev.Kind == etcdstore.EventWaiting || ev.Kind == etcdstore.EventWaitRoot:
		p.event(ev)
	case ev.Kind == etcdstore.EventRefLost && ev.ID == id:
		select {
		case r.notices <- agent.Notice{Kind: agent.NoticeRefLost, ID: id, Err: ev.Err}:
		default:
		}
	}
}

func (r *directRef) Done() <-chan struct{}        { return nil }
func (r *directRef) Err() error                   { return nil }
func (r *directRef) Notices() <-chan agent.Notice { return r.notices }
func (r *directRef) NodePID() int                 { return 0 }

// Close releases the reference and the store (whose lease revocation
// would release it anyway).
func (r *directRef) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), r.c.cfg.OpTimeout)
	defer cancel()
	err := r.h.DecRefContext(ctx)
	r.c.Close()
	return err
}
