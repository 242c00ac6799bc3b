package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
	"time"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/jobrun"
)

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
	lost := make(chan etcdstore.Event, 1)
	// IncRef waits for a build in progress: show what it waits for.
	prog := newProgress(e.stderr, id, isTerminal(e.stderr))
	defer prog.stop()
	c, err := e.connect(ctx, f.cfg, etcdstore.WithPurpose(fmt.Sprintf("granary run %s", argv[0])),
		etcdstore.WithEvents(func(ev etcdstore.Event) {
			if ev.Kind == etcdstore.EventWaiting || ev.Kind == etcdstore.EventWaitRoot {
				prog.event(ev)
			}
			if ev.Kind == etcdstore.EventRefLost && ev.ID == id {
				select {
				case lost <- ev:
				default:
				}
			}
		}))
	if err != nil {
		return err
	}
	defer c.Close()
	h := c.store.Handle(id)
	err = h.IncRefContext(ctx)
	prog.stop()
	if err != nil {
		if errors.Is(err, core.ErrPackageNotExist) {
			return jobrun.NotExist(id)
		}
		return err
	}
	defer func() {
		dctx, cancel := context.WithTimeout(context.Background(), f.cfg.OpTimeout)
		defer cancel()
		h.DecRefContext(dctx) //nolint:errcheck // Close revokes the lease anyway
	}()

	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, jobrun.Forwarded...)
	defer signal.Stop(sigs)

	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), EnvPkg+"="+h.OutputDirectory())
	cmd.Stdin, cmd.Stdout, cmd.Stderr = e.stdin, e.stdout, e.stderr
	if err := cmd.Start(); err != nil {
		return &ExitErr{Code: 127, Err: fmt.Errorf("granary: run %s: %w", argv[0], err)}
	}
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()

	var refLost bool
	var kill <-chan time.Time
	for {
		select {
		case s := <-sigs:
			cmd.Process.Signal(s) //nolint:errcheck // it may have exited
		case ev := <-lost:
			refLost = true
			fmt.Fprintf(e.stderr, "granary: the reference to %s was lost (%v); the package may be gone: stopping %s\n", id, ev.Err, argv[0])
			cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck
			kill = time.After(10 * time.Second)
		case <-kill:
			cmd.Process.Kill() //nolint:errcheck
		case err := <-waited:
			if refLost {
				return &ExitErr{Code: ExitError, Err: fmt.Errorf("granary: %s stopped: its reference to %s was lost", argv[0], id)}
			}
			return jobrun.ChildExit(err)
		}
	}
}
