package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/reaper"
)

// Environment of a builder and of a `run` command.
const (
	EnvOut  = "GRANARY_OUT"
	EnvLogs = "GRANARY_LOGS"
	EnvPkg  = "GRANARY_PKG"
)

func cmdBuild(ctx context.Context, e *env, args []string) error {
	f, err := e.newFlags("build", false)
	if err != nil {
		return err
	}
	id, argv, err := e.parseIDCmd(f, args)
	if err != nil {
		return err
	}
	prog := newProgress(e.stderr, id, isTerminal(e.stderr))
	defer prog.stop()
	var cacheEvents eventLog
	hook := func(ev etcdstore.Event) {
		prog.event(ev)
		if ev.ID == id {
			cacheEvents.add(ev)
		}
	}
	c, err := e.connect(ctx, f.cfg, etcdstore.WithEvents(hook), etcdstore.WithPurpose("granary build"))
	if err != nil {
		return err
	}
	defer c.Close()

	h := c.store.Handle(id)
	var ran bool
	var logPath string
	out, err := h.BuildOutcome(ctx, func(bctx context.Context) error {
		ran = true
		logPath = filepath.Join(h.LoggingDirectory(), "build-"+time.Now().UTC().Format("20060102T150405.000")+".log")
		return runBuilder(bctx, argv, h.OutputDirectory(), h.LoggingDirectory(), logPath, e.stdout, e.stderr)
	})
	prog.stop()
	if err != nil {
		var xe *exec.ExitError
		switch {
		case ctx.Err() != nil:
			return &ExitErr{Code: 130, Err: fmt.Errorf("granary: build %q interrupted; the builder was stopped and nothing was published", id)}
		case errors.Is(err, etcdstore.ErrLeaseLost), errors.Is(err, etcdstore.ErrFenced):
			// Not the builder's fault: say why it was stopped or refused.
			return fmt.Errorf("granary: build %q abandoned, nothing published: %w (log: %s)", id, err, logPath)
		case errors.As(err, &xe) && ran:
			return &ExitErr{Code: max(xe.ExitCode(), 1), Err: fmt.Errorf("granary: build %q failed: %s: %v (log: %s)", id, argv[0], xe, logPath)}
		case ran && logPath != "":
			return fmt.Errorf("granary: build %q failed: %w (log: %s)", id, err, logPath)
		}
		return err
	}
	switch out.How {
	case etcdstore.FromCache:
		fmt.Fprintf(e.stderr, "granary: %s: fetched from the remote cache %s in %v\n", id, c.cache, out.Elapsed.Round(time.Millisecond))
	case etcdstore.Built:
		if ev := cacheEvents.last(etcdstore.EventCacheMiss); ev != nil && ev.Err != nil {
			fmt.Fprintf(e.stderr, "granary: %s: warning: the remote cache failed, so it was built: %v\n", id, ev.Err)
		}
		fmt.Fprintf(e.stderr, "granary: %s: built in %v\n", id, out.Elapsed.Round(time.Millisecond))
		if c.cache != nil {
			// Closing the store waits for the upload to the cache.
			c.store.Close()
			if ev := cacheEvents.last(etcdstore.EventCacheUploadFailed); ev != nil {
				fmt.Fprintf(e.stderr, "granary: %s: warning: not uploaded to the remote cache: %v\n", id, ev.Err)
			} else if cacheEvents.has(etcdstore.EventCacheStored) {
				fmt.Fprintf(e.stderr, "granary: %s: uploaded to the remote cache %s\n", id, c.cache)
			}
		}
	case etcdstore.Waited:
		fmt.Fprintf(e.stderr, "granary: %s: built by %s (waited %v); available\n", id, out.Package.BuiltBy, out.Waited.Round(time.Millisecond))
	default:
		fmt.Fprintf(e.stderr, "granary: %s: already available\n", id)
	}
	return nil
}

// runBuilder runs argv as the builder: GRANARY_OUT and GRANARY_LOGS set, its
// output shown and copied to logPath. It runs under a guard
// (internal/reaper) that kills the builder's whole tree, including
// processes that left its process group or session, when ctx ends (the
// build was cancelled or the lease is in doubt), when the builder exits, and
// when this process dies, even by SIGKILL.
func runBuilder(ctx context.Context, argv []string, out, logs, logPath string, stdout, stderr io.Writer) error {
	logf, err := os.Create(logPath)
	if err != nil {
		return fmt.Errorf("build log: %w", err)
	}
	defer logf.Close()
	cmd, err := reaper.Command(ctx, argv...)
	if err != nil {
		return err
	}
	cmd.Env = append(cmd.Env, EnvOut+"="+out, EnvLogs+"="+logs)
	var mu sync.Mutex // the log gets both streams
	cmd.Stdout = io.MultiWriter(stdout, lockedWriter{&mu, logf})
	cmd.Stderr = io.MultiWriter(stderr, lockedWriter{&mu, logf})
	return cmd.Run()
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// progress shows waits on another host's build: on a terminal a line
// refreshed every second, otherwise a line when the wait starts and every
// 10 s.
type progress struct {
	w   io.Writer
	id  string
	tty bool

	mu      sync.Mutex
	cur     *etcdstore.Event
	started time.Time
	stopc   chan struct{}
	done    chan struct{}
	stopped bool
}

func newProgress(w io.Writer, id string, tty bool) *progress {
	return &progress{w: w, id: id, tty: tty, stopc: make(chan struct{}), done: make(chan struct{})}
}

// event is the store's event hook; it must not block.
func (p *progress) event(ev etcdstore.Event) {
	if ev.ID != p.id {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		return
	}
	switch ev.Kind {
	case etcdstore.EventWaiting:
		first := p.cur == nil
		p.cur = &ev
		if first {
			p.started = time.Now()
			go p.loop()
		}
		p.printLocked()
	case etcdstore.EventLockDelay:
		fmt.Fprintf(p.w, "%sgranary: %s: an earlier attempt did not finish (its host died or lost its lease) and left its output; waiting %v before moving it aside\n", p.clear(), p.id, ev.Elapsed)
	case etcdstore.EventLastFailed:
		fmt.Fprintf(p.w, "%sgranary: %s: the last attempt failed on %s (pid %d, started %s; logs in %s): %v; this is a new attempt\n",
			p.clear(), p.id, ev.Host, ev.PID, ev.Since.Format(time.RFC3339), ev.LogDir, ev.Err)
	case etcdstore.EventWaitVisible:
		fmt.Fprintf(p.w, "%sgranary: %s: published by %s, but not visible on this host yet (%v); waiting up to %v (see \"Running on NFS\" in the README)\n",
			p.clear(), p.id, ev.Host, ev.Err, ev.Elapsed)
	case etcdstore.EventFailed:
		if p.cur != nil {
			fmt.Fprintf(p.w, "%sgranary: %s: the build on %s failed; log: %s\n", p.clear(), p.id, ev.Host, ev.LogDir)
		}
	}
}

func (p *progress) clear() string {
	if p.tty && p.cur != nil {
		return "\r\033[K"
	}
	return ""
}

func (p *progress) printLocked() {
	ev := p.cur
	line := fmt.Sprintf("granary: waiting for %s: building on %s, pid %d, for %v; log: %s",
		p.id, ev.Host, ev.PID, time.Since(ev.Since).Round(time.Second), ev.LogDir)
	if p.tty {
		fmt.Fprintf(p.w, "\r\033[K%s", line)
	} else {
		fmt.Fprintln(p.w, line)
	}
}

func (p *progress) loop() {
	defer close(p.done)
	every := 10 * time.Second
	if p.tty {
		every = time.Second
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-p.stopc:
			return
		case <-t.C:
			p.mu.Lock()
			p.printLocked()
			p.mu.Unlock()
		}
	}
}

// stop ends the display; it is idempotent.
func (p *progress) stop() {
	p.mu.Lock()
	if p.stopped {
		p.mu.Unlock()
		return
	}
	p.stopped = true
	looping := p.cur != nil
	close(p.stopc)
	if p.tty && looping {
		fmt.Fprintln(p.w)
	}
	p.mu.Unlock()
	if looping {
		<-p.done
	}
}
