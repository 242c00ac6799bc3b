package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/jobrun"
	"github.com/granary-build/granary/internal/reaper"
	"github.com/granary-build/granary/node"
)

// Environment of a builder and of a `run` command.
const (
	EnvOut  = "GRANARY_OUT"
	EnvLogs = "GRANARY_LOGS"
	EnvPkg  = jobrun.EnvPkg
	// EnvNeeds lists a builder's needs (build --needs) as space-separated
	// ID:PATH pairs in declared order; IDs never contain ':', PATH is the
	// need's contents directory (a stable path the build may embed). It is
	// set, empty, for a build without needs.
	EnvNeeds = "GRANARY_NEEDS"
)

// needsEnv is GRANARY_NEEDS's value for needs.
func needsEnv(needs []core.Need) string {
	var b strings.Builder
	for i, n := range needs {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(n.ID + ":" + n.Dir)
	}
	return b.String()
}

// needList is the value of build's repeatable --needs.
type needList []string

func (l *needList) String() string { return strings.Join(*l, ",") }

func (l *needList) Set(s string) error {
	if err := core.ValidateID(s); err != nil {
		return err
	}
	*l = append(*l, s)
	return nil
}

func cmdBuild(ctx context.Context, e *env, args []string) error {
	f, err := e.newFlags("build", false)
	if err != nil {
		return err
	}
	var needs needList
	f.Var(&needs, "needs", "a package the build needs (repeatable): held while CMD runs, listed in $"+EnvNeeds+", kept while this package exists")
	id, argv, err := e.parseIDCmd(f, args)
	if err != nil {
		return err
	}
	// The purpose names the command: the node records it, with this
	// process, as who runs the builder (status, events, rm's refusal).
	if ac, err := e.agentFor(ctx, f.cfg, "granary build "+id+" -- "+strings.Join(argv, " "), true); err != nil {
		return err
	} else if ac != nil {
		defer ac.Close()
		return e.buildViaAgent(ctx, ac, id, needs, argv)
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
	if fr, err := c.store.LastFailure(ctx, id); err == nil && fr != nil {
		prog.lastFailure(fr)
	}
	out, ran, err := e.buildWith(ctx, h, id, needs, argv, prog)
	if err != nil {
		return err
	}
	e.reportBuilt(id, out, ran, &cacheEvents, "the remote cache "+fmt.Sprint(c.cache))
	if out.How == etcdstore.Built && ran && c.cache != nil {
		// Closing the store waits for the upload to the cache.
		c.store.Close()
		if ev := cacheEvents.last(etcdstore.EventCacheUploadFailed); ev != nil {
			fmt.Fprintf(e.stderr, "granary: %s: warning: not uploaded to the remote cache: %v\n", id, ev.Err)
		} else if cacheEvents.has(etcdstore.EventCacheStored) {
			fmt.Fprintf(e.stderr, "granary: %s: uploaded to the remote cache %s\n", id, c.cache)
		}
	}
	return nil
}

// builderHandle is what `build` needs of a package: a store's handle or
// the local node's.
type builderHandle interface {
	OutputDirectory() string
	LoggingDirectory() string
	BuildNeedsOutcome(ctx context.Context, needs []string, builder func(context.Context) error) (etcdstore.Outcome, error)
}

// buildWith builds id through h with argv as the builder, and turns a
// failure into build's message and exit code (the builder's code, 127
// when it cannot start, 128+N when signal N killed it). ran reports that
// the builder ran in this process.
func (e *env) buildWith(ctx context.Context, h builderHandle, id string, needs, argv []string, prog *progress) (out etcdstore.Outcome, ran bool, err error) {
	var logPath string
	out, err = h.BuildNeedsOutcome(ctx, needs, func(bctx context.Context) error {
		ran = true
		logPath = filepath.Join(h.LoggingDirectory(), "build-"+time.Now().UTC().Format("20060102T150405.000")+".log")
		env := []string{EnvOut + "=" + h.OutputDirectory(), EnvLogs + "=" + h.LoggingDirectory(), EnvNeeds + "=" + needsEnv(core.NeedsOf(bctx))}
		return runBuilder(bctx, argv, env, logPath, e.stdout, e.stderr)
	})
	prog.stop()
	if err == nil {
		return out, ran, nil
	}
	var be *reaper.ExitError
	var xe *exec.ExitError
	var se *startError
	switch {
	case ctx.Err() != nil:
		err = &ExitErr{Code: 130, Err: fmt.Errorf("granary: build %q interrupted; the builder was stopped and nothing was published", id)}
	case errors.Is(err, node.ErrNodeGone):
		// err names the build already (the store's, the node's and the
		// agent's errors do): add only what became of it.
		err = fmt.Errorf("granary: %w; the local node went away, so the build was abandoned and nothing published", err)
	case errors.Is(err, etcdstore.ErrLeaseLost), errors.Is(err, etcdstore.ErrFenced):
		// Not the builder's fault: say why it was stopped or refused.
		err = fmt.Errorf("granary: %w; the build was abandoned and nothing published (log: %s)", err, logPath)
	case errors.As(err, &se) && ran:
		// run's rule: 127 when the command cannot start.
		err = &ExitErr{Code: 127, Err: fmt.Errorf("granary: build %q failed: cannot start %s: %v (log: %s)", id, argv[0], se.err, logPath)}
	case errors.As(err, &be) && ran:
		// How the builder ended, as its guard saw it (the guard's own exit
		// is only a code).
		err = &ExitErr{Code: be.Code(), Err: fmt.Errorf("granary: build %q failed: %s %s (log: %s)", id, argv[0], be.How(), logPath)}
	case errors.As(err, &xe) && ran:
		// The guard died before it could say (it was killed), or there
		// is no guard (not Linux).
		code, how := jobrun.ExitStatus(xe)
		err = &ExitErr{Code: code, Err: fmt.Errorf("granary: build %q failed: %s %s (log: %s)", id, argv[0], how, logPath)}
	case ran && logPath != "":
		err = fmt.Errorf("granary: %w (log: %s)", err, logPath)
	}
	return out, ran, err
}

// reportBuilt says how build came by the package; cache names the remote
// cache for a fetch.
func (e *env) reportBuilt(id string, out etcdstore.Outcome, ran bool, cacheEvents *eventLog, cache string) {
	switch {
	case out.How == etcdstore.FromCache:
		fmt.Fprintf(e.stderr, "granary: %s: fetched from %s in %v\n", id, cache, out.Elapsed.Round(time.Millisecond))
	case out.How == etcdstore.Built && ran:
		if ev := cacheEvents.last(etcdstore.EventCacheMiss); ev != nil && ev.Err != nil {
			fmt.Fprintf(e.stderr, "granary: %s: warning: the remote cache failed, so it was built: %v\n", id, ev.Err)
		}
		fmt.Fprintf(e.stderr, "granary: %s: built in %v\n", id, out.Elapsed.Round(time.Millisecond))
	case out.How == etcdstore.Built:
		fmt.Fprintf(e.stderr, "granary: %s: built by another job on this host (waited %v); available\n", id, out.Elapsed.Round(time.Millisecond))
	case out.How == etcdstore.Waited && out.Package != nil:
		fmt.Fprintf(e.stderr, "granary: %s: built by %s (waited %v); available\n", id, out.Package.BuiltBy, out.Waited.Round(time.Millisecond))
	default:
		fmt.Fprintf(e.stderr, "granary: %s: already available\n", id)
	}
}

// runBuilder runs argv as the builder with env (GRANARY_OUT, GRANARY_LOGS,
// GRANARY_NEEDS) added to its environment, its output shown and copied to logPath. It runs under a guard
// (internal/reaper) that kills the builder's whole tree, including
// processes that left its process group or session, when ctx ends (the
// build was cancelled or the lease is in doubt), when the builder exits, and
// when this process dies, even by SIGKILL.
func runBuilder(ctx context.Context, argv, env []string, logPath string, stdout, stderr io.Writer) error {
	logf, err := os.Create(logPath)
	if err != nil {
		return fmt.Errorf("build log: %w", err)
	}
	defer logf.Close()
	cmd, err := reaper.Command(ctx, argv...)
	if err != nil {
		return err
	}
	cmd.Env = append(cmd.Env, env...)
	var mu sync.Mutex // the log gets both streams
	cmd.Stdout = io.MultiWriter(stdout, lockedWriter{&mu, logf})
	cmd.Stderr = io.MultiWriter(stderr, lockedWriter{&mu, logf})
	// A command that cannot be found fails here, before the guard starts,
	// so that it is reported as not started (exit 127), as with run.
	if _, err := exec.LookPath(argv[0]); err != nil {
		fmt.Fprintf(logf, "granary: cannot start %s: %v\n", argv[0], err)
		return &startError{err}
	}
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(logf, "granary: cannot start %s: %v\n", argv[0], err)
		return &startError{err}
	}
	return cmd.Wait()
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
	failure *etcdstore.FailureRecord // the last failed attempt, from before the build
	cur     *etcdstore.Event
	started time.Time

	building     bool      // our own attempt runs: no more waiting line
	inPlace      bool      // a line is shown in place (tty) and not yet ended
	lastSealLine time.Time // non-tty: when the last sealing line was printed
	stopc        chan struct{}
	done         chan struct{}
	stopped      bool
}

func newProgress(w io.Writer, id string, tty bool) *progress {
	return &progress{w: w, id: id, tty: tty, stopc: make(chan struct{}), done: make(chan struct{})}
}

// lastFailure sets the failure record to mention when our attempt starts.
func (p *progress) lastFailure(fr *etcdstore.FailureRecord) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.failure = fr
}

// lastLog is the newest log of a failed attempt, or its directory.
func lastLog(fr *etcdstore.FailureRecord) string {
	if len(fr.Logs) > 0 {
		return fr.Logs[len(fr.Logs)-1]
	}
	return fr.LogDir
}

// event is the store's event hook; it must not block.
func (p *progress) event(ev etcdstore.Event) {
	if ev.ID != p.id && ev.Kind != etcdstore.EventWaitRoot {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		return
	}
	switch ev.Kind {
	case etcdstore.EventWaitRoot:
		fmt.Fprintf(p.w, "%sgranary: %v, but etcd says the prefix has a shared root (bound by %s at %s): looking for it again for up to %v (a stale view of the shared root, or the volume is not mounted)\n",
			p.clear(), ev.Err, ev.Host, ev.Since.Format(time.RFC3339), ev.Elapsed)
	case etcdstore.EventWaiting:
		first := p.cur == nil
		p.cur = &ev
		if first {
			p.started = time.Now()
			go p.loop()
		}
		p.printLocked()
	case etcdstore.EventBuilding:
		// Our attempt runs: the waiting line, if any, is over.
		p.building = true
		if p.inPlace {
			fmt.Fprint(p.w, p.clear())
		}
		if fr := p.failure; fr != nil {
			fmt.Fprintf(p.w, "%sgranary: %s: the last attempt failed %s on %s (%s); log: %s; building again\n",
				p.clear(), p.id, ago(fr.Ended), fr.Host, failureStatus(fr), lastLog(fr))
		}
	case etcdstore.EventSealing:
		p.sealingLocked(ev)
	case etcdstore.EventLockDelay:
		fmt.Fprintf(p.w, "%sgranary: %s: an earlier attempt did not finish (its host died or lost its lease) and left its output; waiting %v before moving it aside\n", p.clear(), p.id, ev.Elapsed)
	case etcdstore.EventLastFailed:
		p.failure = nil // said here, from the live record: not again at EventBuilding
		fmt.Fprintf(p.w, "%sgranary: %s: the last attempt failed on %s (pid %d, started %s; logs in %s): %v; this is a new attempt\n",
			p.clear(), p.id, ev.Host, ev.PID, ev.Since.Format(time.RFC3339), ev.LogDir, ev.Err)
	case etcdstore.EventWaitInvalid:
		fmt.Fprintf(p.w, "%sgranary: %s: %v; waiting for its holders to leave and its removal, then building it anew\n", p.clear(), p.id, ev.Err)
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
	if p.tty && p.inPlace {
		p.inPlace = false // the message written after this ends the line
		return "\r\033[K"
	}
	return ""
}

func (p *progress) printLocked() {
	ev := p.cur
	line := fmt.Sprintf("granary: waiting for %s: building on %s, pid %d, for %v; log: %s",
		p.id, ev.Host, ev.PID, time.Since(ev.Since).Round(time.Second), ev.LogDir)
	p.showLocked(line)
}

// showLocked shows a status line: on a terminal in place, cut to the
// terminal's width so that it never wraps (a wrapped line cannot be
// rewritten in place and leaves a stale copy per update); otherwise as a
// line of its own.
func (p *progress) showLocked(line string) {
	if p.tty {
		fmt.Fprintf(p.w, "\r\033[K%s", fitWidth(line, termWidth(p.w)))
		p.inPlace = true
	} else {
		fmt.Fprintln(p.w, line)
	}
}

// sealingLocked shows the store sealing our tree: in place on a terminal,
// else a line every 5 s and one at the end.
func (p *progress) sealingLocked(ev etcdstore.Event) {
	if ev.ID != p.id {
		return
	}
	rate := float64(ev.Size) / max(ev.Elapsed.Seconds(), 0.001)
	verb := "sealing"
	if ev.Done {
		verb = "sealed"
	}
	line := fmt.Sprintf("granary: %s: %s the output: %d files, %s in %v (%s/s)",
		p.id, verb, ev.Files, human(ev.Size), ev.Elapsed.Round(100*time.Millisecond), human(int64(rate)))
	if !p.tty && !ev.Done && time.Since(p.lastSealLine) < 5*time.Second {
		return
	}
	p.lastSealLine = time.Now()
	p.showLocked(line)
	if ev.Done && p.tty {
		fmt.Fprintln(p.w)
		p.inPlace = false
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
			if !p.building {
				p.printLocked()
			}
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
	if p.tty && p.inPlace {
		fmt.Fprintln(p.w)
		p.inPlace = false
	}
	p.mu.Unlock()
	if looping {
		<-p.done
	}
}
