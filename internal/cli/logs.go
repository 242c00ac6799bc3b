package cli

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/granary-build/granary/etcdstore"
)

// tailEvery is how often `logs --follow` looks for more output. The log is
// on the shared volume (NFS), where no change notification reaches another
// host, so a follower reads again; when the build ends is known from etcd.
const tailEvery = 100 * time.Millisecond

func cmdLogs(ctx context.Context, e *env, args []string) error {
	f, err := e.newFlags("logs", false)
	if err != nil {
		return err
	}
	var follow, list bool
	var attempt int
	f.BoolVar(&follow, "follow", false, "follow the build in progress until it publishes or fails")
	f.BoolVar(&follow, "f", false, "short for --follow")
	f.IntVar(&attempt, "attempt", 0, "print the log of the Nth kept attempt (1: the oldest kept; negative: counted from the newest, -1 the newest)")
	f.BoolVar(&list, "list", false, "list the kept log files, oldest first")
	id, err := e.parseID(f, args)
	if err != nil {
		return err
	}
	if follow && attempt != 0 {
		return usageErr("logs", "--follow follows the current attempt; it does not go with --attempt")
	}
	c, err := e.open(ctx, f)
	if err != nil {
		return err
	}
	defer c.Close()
	dir := c.store.Handle(id).LoggingDirectory()
	if list {
		for _, l := range logFiles(dir) {
			fmt.Fprintln(e.stdout, l.path)
		}
		return nil
	}
	if follow {
		return followLog(ctx, e, c.store, id, dir)
	}
	logs := logFiles(dir)
	if len(logs) == 0 {
		return &ExitErr{Code: ExitNotExist, Err: fmt.Errorf("granary: logs: no build log of %q in %s", id, dir)}
	}
	i := len(logs) - 1
	switch {
	case attempt > 0:
		i = attempt - 1
	case attempt < 0:
		i = len(logs) + attempt
	}
	if i < 0 || i >= len(logs) {
		return &ExitErr{Code: ExitNotExist, Err: fmt.Errorf("granary: logs: %q has %d kept log(s); no attempt %d", id, len(logs), attempt)}
	}
	return catFile(e.stdout, logs[i].path)
}

type logFile struct {
	path string
	mod  time.Time
}

// logFiles lists the regular files of dir, oldest first.
func logFiles(dir string) []logFile {
	entries, _ := os.ReadDir(dir)
	var out []logFile
	for _, ent := range entries {
		info, err := ent.Info()
		if err != nil || !info.Mode().IsRegular() {
			continue
		}
		out = append(out, logFile{filepath.Join(dir, ent.Name()), info.ModTime()})
	}
	slices.SortFunc(out, func(a, b logFile) int { return cmp.Or(a.mod.Compare(b.mod), strings.Compare(a.path, b.path)) })
	return out
}

func catFile(w io.Writer, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("granary: logs: %w", err)
	}
	defer f.Close()
	_, err = io.Copy(w, f)
	return err
}

// followLog prints the log of the attempt in progress as it grows, until
// the attempt ends (published, failed or died, as etcd says), then prints
// what is left and says how it ended. With no attempt in progress it
// prints the newest log.
func followLog(ctx context.Context, e *env, s *etcdstore.Store, id, dir string) error {
	info, err := s.Inspect(ctx, id)
	if err != nil {
		return err
	}
	b := info.Build
	if b == nil || b.State != etcdstore.BuildRunning {
		logs := logFiles(dir)
		if len(logs) == 0 {
			return &ExitErr{Code: ExitNotExist, Err: fmt.Errorf("granary: logs: no build of %q in progress and no log in %s", id, dir)}
		}
		state, err := s.WaitBuildEnd(ctx, id) // returns at once: absent, failed or available
		if err != nil {
			return err
		}
		fmt.Fprintf(e.stderr, "granary: %s: no build in progress (%s); its last log:\n", id, state)
		return catFile(e.stdout, logs[len(logs)-1].path)
	}
	fmt.Fprintf(e.stderr, "granary: %s: following the build on %s (pid %d, since %s)\n", id, b.Host, b.PID, b.Started.Format(time.RFC3339))

	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type ending struct {
		state etcdstore.State
		err   error
	}
	endc := make(chan ending, 1)
	go func() {
		st, err := s.WaitBuildEnd(wctx, id)
		endc <- ending{st, err}
	}()

	var cur *os.File
	defer func() {
		if cur != nil {
			cur.Close()
		}
	}()
	t := time.NewTicker(tailEvery)
	defer t.Stop()
	for {
		if cur == nil {
			// The attempt's log: the newest file written since it started.
			if logs := logFiles(dir); len(logs) > 0 && !logs[len(logs)-1].mod.Before(b.Started.Add(-10*time.Millisecond)) {
				if cur, err = os.Open(logs[len(logs)-1].path); err != nil {
					return fmt.Errorf("granary: logs: %w", err)
				}
			}
		}
		if cur != nil {
			if _, err := io.Copy(e.stdout, cur); err != nil {
				return err
			}
		}
		select {
		case end := <-endc:
			if cur != nil {
				io.Copy(e.stdout, cur) //nolint:errcheck // the last of it, best effort
			}
			if end.err != nil {
				if ctx.Err() != nil {
					return &ExitErr{Code: 130}
				}
				return end.err
			}
			fmt.Fprintf(e.stderr, "granary: %s: the build ended: %s\n", id, end.state)
			if end.state != etcdstore.StateAvailable {
				return &ExitErr{Code: ExitError}
			}
			return nil
		case <-t.C:
		case <-ctx.Done():
			return &ExitErr{Code: 130}
		}
	}
}
