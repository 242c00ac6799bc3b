package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/granary-build/granary/etcdstore"
)

func cmdEvents(ctx context.Context, e *env, args []string) error {
	f, err := e.newFlags("events", true)
	if err != nil {
		return err
	}
	var since int64
	f.Int64Var(&since, "since", 0, "start at this etcd revision (each event shows its own: resume with the last one + 1); 0: from now")
	if err := noArgs(e, f, args); err != nil {
		return err
	}
	if since < 0 {
		return usageErr("events", "--since %d: a revision is positive", since)
	}
	c, err := e.open(ctx, f)
	if err != nil {
		return err
	}
	defer c.Close()
	enc := json.NewEncoder(e.stdout)
	ready := func(rev int64) {
		fmt.Fprintf(e.stderr, "granary: events from revision %d (stop with ^C; resume with --since REV+1)\n", rev)
	}
	err = c.store.WatchCluster(ctx, since, ready, func(ev etcdstore.ClusterEvent) error {
		if f.json {
			return enc.Encode(ev)
		}
		_, err := fmt.Fprintln(e.stdout, eventLine(ev))
		return err
	})
	if errors.Is(err, context.Canceled) && ctx.Err() != nil {
		return nil // ^C: the normal end
	}
	if errors.Is(err, etcdstore.ErrFutureRevision) {
		return &ExitErr{Code: ExitUsage, Err: fmt.Errorf("granary: events: --since: %w; omit --since to follow from now", err)}
	}
	return err
}

// eventLine is one event as a line of text: revision, time, kind, package
// and what else is known.
func eventLine(ev etcdstore.ClusterEvent) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%-8d %s %-12s", ev.Rev, ev.Time.Local().Format("15:04:05"), ev.Kind)
	if ev.ID != "" {
		fmt.Fprintf(&b, " %s", ev.ID)
	}
	kv := func(k string, v any) { fmt.Fprintf(&b, " %s=%v", k, v) }
	if ev.Host != "" {
		kv("host", ev.Host)
	}
	if ev.PID != 0 {
		kv("pid", ev.PID)
	}
	if ev.Builder != "" {
		kv("builder", ev.Builder)
	}
	if ev.Kind == etcdstore.ClusterPublished {
		kv("size", strings.ReplaceAll(human(ev.Size), " ", ""))
		kv("seconds", fmt.Sprintf("%.1f", ev.Seconds))
	}
	if ev.Version != "" {
		kv("version", ev.Version)
	}
	if ev.By != "" {
		kv("by", ev.By)
	}
	if !ev.Until.IsZero() {
		kv("until", ev.Until.Local().Format(time.RFC3339))
	}
	if ev.Reason != "" {
		kv("reason", fmt.Sprintf("%q", ev.Reason))
	}
	if ev.Cause != "" {
		kv("with", ev.Cause)
	}
	if ev.Purpose != "" {
		kv("purpose", fmt.Sprintf("%q", ev.Purpose))
	}
	if ev.Error != "" {
		kv("error", fmt.Sprintf("%q", ev.Error))
	}
	if ev.LogDir != "" && ev.Kind != etcdstore.ClusterBuilding {
		kv("logs", ev.LogDir)
	}
	return b.String()
}
