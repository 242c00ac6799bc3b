package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/node"
)

func (e *env) open(ctx context.Context, f *flags) (*conn, error) {
	return e.connect(ctx, f.cfg, etcdstore.WithPurpose("granary "+f.name))
}

// openID parses the flags of a command that takes one package ID and
// connects: the common start of inspect, rm and verify.
func (e *env) openID(ctx context.Context, name string, withJSON bool, args []string) (*flags, string, *conn, error) {
	f, err := e.newFlags(name, withJSON)
	if err != nil {
		return nil, "", nil, err
	}
	id, err := e.parseID(f, args)
	if err != nil {
		return nil, "", nil, err
	}
	c, err := e.open(ctx, f)
	if err != nil {
		return nil, "", nil, err
	}
	return f, id, c, nil
}

func noArgs(e *env, f *flags, args []string) error {
	pos, cmd, err := e.parse(f, args)
	if err != nil {
		return err
	}
	if len(pos)+len(cmd) > 0 {
		return usageErr(f.name, "unexpected argument %q", append(pos, cmd...)[0])
	}
	return nil
}

func cmdLs(ctx context.Context, e *env, args []string) error {
	f, err := e.newFlags("ls", true)
	if err != nil {
		return err
	}
	if err := noArgs(e, f, args); err != nil {
		return err
	}
	c, err := e.open(ctx, f)
	if err != nil {
		return err
	}
	defer c.Close()
	list, err := listWithFailures(ctx, c.store)
	if err != nil {
		return err
	}
	if f.json {
		return writeJSON(e.stdout, list)
	}
	tw := tabwriter.NewWriter(e.stdout, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSTATE\tSIZE\tREFS\tNEEDED BY\tPINNED\tLAST USED\tBUILT BY\tLAST FAILURE")
	for _, p := range list {
		size, by := "-", "-"
		if p.Package != nil {
			size, by = human(p.Package.Size), p.Package.BuiltBy
		} else if p.Build != nil {
			by = p.Build.Host
		}
		failed := "-"
		if p.LastFailure != nil {
			failed = fmt.Sprintf("%s on %s (%s)", ago(p.LastFailure.Ended), p.LastFailure.Host, failureStatus(p.LastFailure))
		}
		state := string(p.State)
		if p.Invalid != nil {
			state += " (invalid)" // no new reference; removed when its last holder leaves
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%s\t%s\t%s\t%s\n", p.ID, state, size, p.Refs, p.NeededBy, pinnedColumn(p.Pin), ago(p.ATime), by, failed)
	}
	return tw.Flush()
}

func cmdInspect(ctx context.Context, e *env, args []string) error {
	f, id, c, err := e.openID(ctx, "inspect", true, args)
	if err != nil {
		return err
	}
	defer c.Close()
	// Nodes on other hosts say how many of their jobs hold it.
	info, err := c.store.AskHolders(ctx, id, etcdstore.DefaultHoldersWait)
	if err != nil {
		return err
	}
	fr, err := c.store.LastFailure(ctx, id)
	if err != nil {
		return err
	}
	absent := info.State == etcdstore.StateAbsent
	if fr != nil && absent {
		info.State = etcdstore.StateFailed // its builder is gone, its record stays
	}
	// Failed is absent too, whether its builder (a node) still runs or not.
	absent = absent || info.State == etcdstore.StateFailed
	holders := e.localHolders(ctx, f.cfg, id)
	if f.json {
		if err := writeJSON(e.stdout, struct {
			etcdstore.Info
			LastFailure *etcdstore.FailureRecord `json:"last_failure,omitempty"`
		}{info, fr}); err != nil {
			return err
		}
	} else {
		printInfo(e, info)
		printFailure(e, fr)
		printHolders(e, holders)
	}
	if absent {
		return &ExitErr{Code: ExitNotExist, Err: fmt.Errorf("granary: package %q does not exist", id)}
	}
	return nil
}

// pinnedColumn is ls's PINNED: "-", "yes" or "until TIME".
func pinnedColumn(p *etcdstore.PinRecord) string {
	switch {
	case p == nil || p.Expired(time.Now()):
		return "-"
	case p.Until.IsZero():
		return "yes"
	}
	return "until " + p.Until.Format(time.RFC3339)
}

// printGraph prints a package's needs, dependents, pin and invalidation.
func printGraph(w io.Writer, info etcdstore.Info) {
	if p := info.Package; p != nil && len(p.Needs) > 0 {
		fmt.Fprintf(w, "needs:   %s\n", strings.Join(p.Needs, ", "))
	}
	if len(info.NeededBy) > 0 {
		fmt.Fprintf(w, "needed by: %s\n", strings.Join(info.NeededBy, ", "))
	}
	if p := info.Pin; p != nil {
		expired := ""
		if p.Expired(time.Now()) {
			expired = " (expired: the next removal drops it)"
		}
		fmt.Fprintf(w, "pin:     %s, at %s%s\n", pinText(p), p.At.Format(time.RFC3339), expired)
	}
	if r := info.Invalid; r != nil {
		fmt.Fprintf(w, "invalid: by %s on %s at %s: %s (no new reference; removed when its last holder leaves)\n",
			r.By, r.Host, r.At.Format(time.RFC3339), invalidReason(r))
	}
	if r := info.Invalidated; r != nil {
		fmt.Fprintf(w, "invalidated: by %s on %s at %s: %s; removed at %s\n",
			r.By, r.Host, r.At.Format(time.RFC3339), invalidReason(r), r.Removed.Format(time.RFC3339))
	}
}

func printInfo(e *env, info etcdstore.Info) {
	w := e.stdout
	fmt.Fprintf(w, "id:      %s\nstate:   %s\n", info.ID, info.State)
	if p := info.Package; p != nil {
		fmt.Fprintf(w, "built:   by %s (pid %d) at %s in %.1fs\nsize:    %s (%d bytes)\ndigest:  %s\n",
			p.BuiltBy, p.PID, p.BuiltAt.Format(time.RFC3339), p.BuildSeconds, human(p.Size), p.Size, p.Digest)
	}
	if b := info.Build; b != nil {
		fmt.Fprintf(w, "attempt: %s on %s (pid %d) since %s\n", b.State, b.Host, b.PID, b.Started.Format(time.RFC3339))
		if b.Error != "" {
			fmt.Fprintf(w, "error:   %s\n", b.Error)
		}
	}
	if !info.ATime.IsZero() {
		fmt.Fprintf(w, "used:    %s (%s)\n", info.ATime.Format(time.RFC3339), ago(info.ATime))
	}
	if info.Package != nil {
		// Only a published package has contents; a failed or absent one
		// has none to point at.
		fmt.Fprintf(w, "path:    %s\n", info.OutputDir)
	}
	printGraph(w, info)
	fmt.Fprintf(w, "logs:    %s\nrefs:    %d\n", info.LogDir, len(info.Refs))
	for _, r := range info.Refs {
		fmt.Fprintf(w, "  - %s\n", holder(r))
	}
}

func holder(r etcdstore.RefInfo) string {
	s := fmt.Sprintf("%s pid %d since %s (lease %s)", r.Host, r.PID, r.Since.Format(time.RFC3339), r.Lease)
	if r.Purpose != "" {
		s += ": " + r.Purpose
	}
	switch {
	case r.Cached && !r.HoldersAt.IsZero():
		s += fmt.Sprintf(" (the node's reference for its host's jobs: %d held it at %s)", r.Holders, r.HoldersAt.Format(time.TimeOnly))
	case r.Cached:
		s += " (the node's reference for its host's jobs; held by a job there, or lingering)"
	}
	if len(r.Pods) > 0 {
		s += "; volumes of pod " + strings.Join(r.Pods, ", pod ")
	}
	return s
}

func cmdGC(ctx context.Context, e *env, args []string) error {
	f, err := e.newFlags("gc", true)
	if err != nil {
		return err
	}
	var opts etcdstore.PruneOptions
	var target string
	f.Var(node.NonNegative(&opts.OlderThan), "older-than", "remove packages unused for longer than this (0s: any age)")
	f.StringVar(&target, "target-size", "", "remove oldest first until the store is at most this big (e.g. 50G; 0: empty)")
	f.BoolVar(&opts.DryRun, "dry-run", false, "say what would be removed; remove nothing")
	f.DurationVar(&opts.Grace, "grace", etcdstore.DefaultPruneGrace, "never remove what was used or made within this long (0: no grace)")
	f.IntVar(&opts.MaxRemovals, "max", 0, "remove at most this many packages (0: no cap)")
	var failures bool
	f.BoolVar(&failures, "failures", false, "drop the records of failed attempts instead of packages (those older than --older-than, if given; else all)")
	if err := noArgs(e, f, args); err != nil {
		return err
	}
	given := map[string]bool{}
	f.Visit(func(fl *flag.Flag) { given[fl.Name] = true })
	if failures {
		if given["target-size"] {
			return usageErr("gc", "--failures drops failure records only; run it apart from --target-size")
		}
		return dropFailures(ctx, e, f, opts)
	}
	if !given["older-than"] && !given["target-size"] {
		return usageErr("gc", "give --older-than or --target-size (or both); 0 is a value: --older-than 0s selects every package")
	}
	// A zero given on purpose means zero; etcdstore reads a zero field as
	// "not set", and spells a real zero as a negative value.
	if given["older-than"] && opts.OlderThan == 0 {
		opts.OlderThan = etcdstore.AnyAge
	}
	if given["target-size"] {
		if opts.TargetBytes, err = parseSize(target); err != nil {
			return usageErr("gc", "--target-size %q: %v", target, err)
		}
		if opts.TargetBytes == 0 {
			opts.TargetBytes = etcdstore.EmptyStore
		}
	}
	if opts.Grace <= 0 {
		opts.Grace = etcdstore.NoGrace
	}
	c, err := e.open(ctx, f)
	if err != nil {
		return err
	}
	defer c.Close()
	rep, err := c.store.Prune(ctx, opts)
	if errors.Is(err, etcdstore.ErrCollectorBusy) {
		return fmt.Errorf("granary: gc: another collector is sweeping; try again later")
	}
	if err != nil {
		return err
	}
	if f.json {
		return writeJSON(e.stdout, rep)
	}
	printPrune(e, rep, opts.Grace)
	return nil
}

// printPrune prints a sweep's report: each package removed or kept and
// why, orphans, totals, the trash, and what the trash could not delete.
func printPrune(e *env, rep etcdstore.PruneReport, grace time.Duration) {
	verb := "removed"
	if rep.DryRun {
		verb = "would remove"
	}
	for _, p := range rep.Removed {
		fmt.Fprintf(e.stdout, "%s %s (%s, last used %s)\n", verb, p.ID, human(p.Size), ago(p.ATime))
	}
	for _, k := range rep.Kept {
		fmt.Fprintf(e.stdout, "kept %s (%s)\n", k.ID, keptReason(k, grace))
	}
	for _, id := range rep.Orphans {
		fmt.Fprintf(e.stdout, "%s orphan directory %s\n", verb, id)
	}
	fmt.Fprintf(e.stdout, "gc: %s %d of %d packages, %s of %s\n", verb, len(rep.Removed), rep.Packages, human(rep.FreedBytes), human(rep.TotalBytes))
	if !rep.DryRun {
		fmt.Fprintf(e.stdout, "gc: trash: %d entries deleted, %d file(s) pending (still open on some host; kept until closed or %v old)\n",
			rep.TrashEntries, rep.TrashPending, etcdstore.SillyMaxAge)
	}
	for _, msg := range rep.TrashErrors {
		fmt.Fprintf(e.stderr, "granary: gc: cannot delete from the trash (the next gc tries again): %s\n", msg)
	}
}

// keptReason says why gc kept a package: "in grace: …", "held by …",
// "lingering on …", "being built" or "used during the sweep".
func keptReason(k etcdstore.KeptPackage, grace time.Duration) string {
	hosts := func() string {
		var hs []string
		for _, r := range k.Refs {
			if !slices.Contains(hs, r.Host) {
				hs = append(hs, r.Host)
			}
		}
		return strings.Join(hs, ", ")
	}
	switch k.Reason {
	case etcdstore.KeptGrace:
		return fmt.Sprintf("in grace: last used %s, grace %v", ago(k.ATime), grace)
	case etcdstore.KeptHeld:
		var b strings.Builder
		for i, r := range k.Refs {
			if i > 0 {
				b.WriteString("; ")
			}
			fmt.Fprintf(&b, "%s pid %d", r.Host, r.PID)
			if r.Purpose != "" {
				b.WriteString(": " + r.Purpose)
			}
		}
		return fmt.Sprintf("held by %d job(s): %s", len(k.Refs), b.String())
	case etcdstore.KeptLingering:
		return fmt.Sprintf("lingering on %s: its node keeps a reference after its last job; 'granary rm' asks it to let go", hosts())
	case etcdstore.KeptBuilding:
		return "being built"
	}
	return "used during the sweep"
}

type status struct {
	Nodes    []node.Registration `json:"nodes"`
	Building []etcdstore.Summary `json:"building"`
	Failed   []etcdstore.Summary `json:"failed"`
	Packages int                 `json:"packages"`
	Bytes    int64               `json:"bytes"`
	Refs     int                 `json:"refs"`
	Root     string              `json:"root"`
	Prefix   string              `json:"prefix"`
	Local    *node.Local         `json:"local_node,omitempty"`
}

func cmdStatus(ctx context.Context, e *env, args []string) error {
	f, err := e.newFlags("status", true)
	if err != nil {
		return err
	}
	if err := noArgs(e, f, args); err != nil {
		return err
	}
	c, err := e.open(ctx, f)
	if err != nil {
		return err
	}
	defer c.Close()
	st, err := readStatus(ctx, c)
	if err != nil {
		return err
	}
	if f.json {
		return writeJSON(e.stdout, st)
	}
	printStatus(e.stdout, st, c.cli.Endpoints())
	return nil
}

// readStatus gathers the cluster's status: nodes, packages and their
// references, builds in progress, and failed attempts (from a live build
// record, else from the failure record of a package with no later attempt).
func readStatus(ctx context.Context, c *conn) (status, error) {
	st := status{Building: []etcdstore.Summary{}, Failed: []etcdstore.Summary{}, Root: c.store.Root(), Prefix: c.store.Prefix()}
	var err error
	if st.Nodes, err = node.ReadRegistrations(ctx, c.cli, c.cfg.Prefix); err != nil {
		return st, err
	}
	list, err := c.store.List(ctx)
	if err != nil {
		return st, err
	}
	fails, err := c.store.Failures(ctx)
	if err != nil {
		return st, err
	}
	for _, p := range list {
		if p.State == etcdstore.StateFailed {
			delete(fails, p.ID) // shown from its live record
		}
		if p.State == etcdstore.StateAvailable || p.State == etcdstore.StateBuilding {
			delete(fails, p.ID) // an attempt after the failure published or runs
		}
	}
	for id, fr := range fails {
		st.Failed = append(st.Failed, etcdstore.Summary{ID: id, State: etcdstore.StateFailed, Build: &etcdstore.BuildRecord{
			State: etcdstore.BuildFailed, Host: fr.Host, PID: fr.PID, Started: fr.Started, LogDir: fr.LogDir, Attempt: fr.Attempt, Error: fr.Error,
		}})
	}
	slices.SortFunc(st.Failed, func(a, b etcdstore.Summary) int { return strings.Compare(a.ID, b.ID) })
	for _, p := range list {
		switch p.State {
		case etcdstore.StateAvailable:
			st.Packages++
			st.Bytes += p.Package.Size
		case etcdstore.StateBuilding:
			st.Building = append(st.Building, p)
		case etcdstore.StateFailed:
			st.Failed = append(st.Failed, p)
		}
		st.Refs += p.Refs
	}
	if c.cfg.Embedded() {
		if l, err := node.ReadLocal(c.cfg.StateDir); err == nil {
			st.Local = &l
		}
	}
	return st, nil
}

// printStatus prints st for a person.
func printStatus(w io.Writer, st status, endpoints []string) {
	fmt.Fprintf(w, "root %s, prefix %s, etcd %s\n", st.Root, st.Prefix, strings.Join(endpoints, ","))
	fmt.Fprintf(w, "nodes: %d\n", len(st.Nodes))
	for _, n := range st.Nodes {
		gone := ""
		if n.Gone() {
			gone = " (not running: its registration expires with its lease)"
		}
		fmt.Fprintf(w, "  - %s pid %d, up %s, version %s%s\n", n.Name, n.PID, time.Since(n.Started).Round(time.Second), n.Version, gone)
	}
	fmt.Fprintf(w, "builds in progress: %d\n", len(st.Building))
	for _, b := range st.Building {
		fmt.Fprintf(w, "  - %s on %s pid %d%s for %s\n", b.ID, b.Build.Host, b.Build.PID, commandSuffix(b.Build.Command), time.Since(b.Build.Started).Round(time.Second))
	}
	if len(st.Failed) > 0 {
		fmt.Fprintf(w, "failed attempts: %d\n", len(st.Failed))
		for _, b := range st.Failed {
			fmt.Fprintf(w, "  - %s on %s: %s\n", b.ID, b.Build.Host, b.Build.Error)
		}
	}
	fmt.Fprintf(w, "packages: %d (%s), references: %d\n", st.Packages, human(st.Bytes), st.Refs)
}

func cmdVerify(ctx context.Context, e *env, args []string) error {
	f, id, c, err := e.openID(ctx, "verify", true, args)
	if err != nil {
		return err
	}
	defer c.Close()
	verr := c.store.Verify(ctx, id)
	if errors.Is(verr, core.ErrPackageNotExist) {
		return &ExitErr{Code: ExitNotExist, Err: fmt.Errorf("granary: verify: package %q does not exist", id)}
	}
	if f.json {
		res := struct {
			ID    string `json:"id"`
			OK    bool   `json:"ok"`
			Error string `json:"error,omitempty"`
		}{ID: id, OK: verr == nil}
		if verr != nil {
			res.Error = verr.Error()
		}
		if err := writeJSON(e.stdout, res); err != nil {
			return err
		}
		if verr != nil {
			return &ExitErr{Code: ExitError}
		}
		return nil
	}
	if verr != nil {
		return verr
	}
	fmt.Fprintf(e.stdout, "%s: ok\n", id)
	return nil
}

// human formats a byte count.
func human(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// parseSize reads 123, 10K, 5M, 2G, 1T (powers of 1024, optional "B"/"iB").
func parseSize(s string) (int64, error) {
	t := strings.TrimSuffix(strings.TrimSuffix(strings.ToUpper(strings.TrimSpace(s)), "B"), "I")
	mult := int64(1)
	if t != "" {
		if i := strings.IndexByte("KMGTP", t[len(t)-1]); i >= 0 {
			mult = int64(1) << (10 * (i + 1))
			t = t[:len(t)-1]
		}
	}
	n, err := strconv.ParseFloat(t, 64)
	if err != nil || n < 0 || math.IsNaN(n) {
		return 0, fmt.Errorf("want a size such as 500M or 20G")
	}
	// 2^63 is exact in a float64: anything at or above it overflows int64.
	if n*float64(mult) >= math.MaxInt64 {
		return 0, fmt.Errorf("size %s is out of range (at most 8E)", s)
	}
	return int64(n * float64(mult)), nil
}

func ago(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return time.Since(t).Round(time.Second).String() + " ago"
}

// listed is one line of `ls`: the store's summary and the last failure.
type listed struct {
	etcdstore.Summary
	LastFailure *etcdstore.FailureRecord `json:"last_failure,omitempty"`
}

// listWithFailures is List with the failure records joined: a package
// whose last attempt failed shows as failed even after its builder's record
// is gone.
func listWithFailures(ctx context.Context, s *etcdstore.Store) ([]listed, error) {
	list, err := s.List(ctx)
	if err != nil {
		return nil, err
	}
	fails, err := s.Failures(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]listed, 0, len(list)+len(fails))
	for _, p := range list {
		out = append(out, listed{Summary: p, LastFailure: fails[p.ID]})
		delete(fails, p.ID)
	}
	for id, fr := range fails {
		out = append(out, listed{Summary: etcdstore.Summary{ID: id, State: etcdstore.StateFailed}, LastFailure: fr})
	}
	slices.SortFunc(out, func(a, b listed) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// failureStatus says how an attempt ended, in a few words.
func failureStatus(fr *etcdstore.FailureRecord) string {
	switch {
	case fr.Panic:
		return "builder panicked"
	case fr.Signal != "":
		return "killed: " + fr.Signal
	case fr.ExitCode != nil:
		return fmt.Sprintf("exit status %d", *fr.ExitCode)
	}
	// A failure recorded by the node (the builder ran in the CLI) has no
	// exit code of its own; its error, when short, says it.
	msg, _, _ := strings.Cut(fr.Error, "\n")
	if msg == "" || len(msg) > 40 {
		return "error"
	}
	return msg
}

func printFailure(e *env, fr *etcdstore.FailureRecord) {
	if fr == nil {
		return
	}
	w := e.stdout
	fmt.Fprintf(w, "last failure: %s on %s (pid %d), %s after %s\n",
		fr.Ended.Format(time.RFC3339), fr.Host, fr.PID, failureStatus(fr), fr.Ended.Sub(fr.Started).Round(time.Millisecond))
	fmt.Fprintf(w, "  error:  %s\n", fr.Error)
	for _, l := range fr.Logs {
		fmt.Fprintf(w, "  log:    %s\n", l)
	}
	fmt.Fprintf(w, "  failed attempts since this record was made: %d (a success does not reset it; 'granary gc --failures' drops the record)\n", fr.Number)
	fmt.Fprintf(w, "  kept until %s\n", fr.Expires.Format(time.RFC3339))
}

// dropFailures is `gc --failures` alone: it drops failure records.
func dropFailures(ctx context.Context, e *env, f *flags, opts etcdstore.PruneOptions) error {
	c, err := e.open(ctx, f)
	if err != nil {
		return err
	}
	defer c.Close()
	ids, err := c.store.DropFailures(ctx, opts.OlderThan, opts.DryRun)
	if err != nil {
		return err
	}
	if f.json {
		return writeJSON(e.stdout, struct {
			DryRun   bool     `json:"dry_run"`
			Failures []string `json:"failures_dropped"`
		}{opts.DryRun, ids})
	}
	verb := "dropped"
	if opts.DryRun {
		verb = "would drop"
	}
	for _, id := range ids {
		fmt.Fprintf(e.stdout, "%s the failure record of %s\n", verb, id)
	}
	fmt.Fprintf(e.stdout, "gc: %s %d failure record(s)\n", verb, len(ids))
	return nil
}

// commandSuffix is ": COMMAND" for a build record that names its
// builder's command (a build through a node), else "".
func commandSuffix(cmd string) string {
	if cmd == "" {
		return ""
	}
	return ": " + cmd
}
