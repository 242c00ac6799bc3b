package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/node"
)

// demoTTL is short so the crashed holder's references expire quickly.
const demoTTL = 3 * time.Second

// demoHost is one simulated host: its own etcd client, store and lease.
type demoHost struct {
	name  string
	cli   *clientv3.Client
	store *etcdstore.Store
}

// demo records what the hosts did and checks the invariants.
type demo struct {
	w     io.Writer
	mu    sync.Mutex
	runs  map[string]int             // builder runs per package
	live  map[string]int             // builders running now per package
	peak  map[string]int             // most builders running at once
	waits map[string]map[string]bool // package → hosts that waited on another's build
	ready map[string]chan struct{}   // closed when every other requester waits
	want  map[string]int             // requesters per package
	fails []string
}

func (d *demo) failf(format string, args ...any) {
	d.mu.Lock()
	defer d.mu.Unlock()
	msg := fmt.Sprintf(format, args...)
	d.fails = append(d.fails, msg)
	fmt.Fprintf(d.w, "   INVARIANT BROKEN: %s\n", msg)
}

func (d *demo) event(host string) func(etcdstore.Event) {
	return func(ev etcdstore.Event) {
		if ev.Kind != etcdstore.EventWaiting {
			return
		}
		d.mu.Lock()
		defer d.mu.Unlock()
		if d.waits[ev.ID] == nil {
			d.waits[ev.ID] = map[string]bool{}
		}
		d.waits[ev.ID][host] = true
		if len(d.waits[ev.ID]) >= d.want[ev.ID]-1 {
			select {
			case <-d.ready[ev.ID]:
			default:
				close(d.ready[ev.ID])
			}
		}
	}
}

// demoRequests are the demo's build requests: shared packages, unique ones,
// and one whose build fails.
var demoRequests = []demoRequest{
	{"host-a", "toolchain-1"}, {"host-b", "toolchain-1"}, {"host-c", "toolchain-1"},
	{"host-b", "sdk-2"}, {"host-c", "sdk-2"},
	{"host-a", "venv-a"}, {"host-b", "venv-b"}, {"host-c", "venv-c"},
	{"host-a", "broken-1"}, {"host-b", "broken-1"}, {"host-c", "broken-1"},
}

// demoRequest is one host asking for one package.
type demoRequest struct{ host, id string }

// demoResult is what one request got.
type demoResult struct {
	host, id string
	err      error
	built    bool
	took     time.Duration
}

func cmdDemo(ctx context.Context, e *env, args []string) error {
	f, err := e.newFlags("demo", false)
	if err != nil {
		return err
	}
	if err := noArgs(e, f, args); err != nil {
		return err
	}
	start := time.Now()
	w := e.stdout
	tmp, err := os.MkdirTemp("", "granary-demo") // short: holds a unix socket
	if err != nil {
		return err
	}
	defer etcdstore.RemoveTree(tmp) //nolint:errcheck // a temporary directory
	emb, err := node.StartEmbedded(ctx, filepath.Join(tmp, "state"))
	if err != nil {
		return err
	}
	defer emb.Close()
	root := filepath.Join(tmp, "root")

	d := newDemo(w, demoRequests)
	hosts := map[string]*demoHost{}
	defer func() {
		for _, h := range hosts {
			h.store.Close() // the crashed host's fails to revoke: its client is gone
			h.cli.Close()
		}
	}()
	if err := d.startHosts(ctx, emb.Endpoint, root, hosts); err != nil {
		return err
	}
	fmt.Fprintf(w, "granary demo: embedded etcd %s, shared root %s, 3 hosts, lease TTL %v\n\n", emb.Endpoint, root, demoTTL)

	results, err := d.buildAll(ctx, hosts)
	if err != nil {
		return err
	}
	d.takeRefs(ctx, hosts, results)
	d.crashAndRemove(ctx, hosts)
	d.collect(ctx, hosts["host-a"].store)

	fmt.Fprintf(w, "\ninvariants checked: one builder run per package and never two at once; waiters on a failed build get ErrBuildFailed;\n"+
		"IncRef only on published packages; no removal while referenced; a crashed holder blocks removal only until its lease expires\n")
	if len(d.fails) > 0 {
		return fmt.Errorf("granary demo: %d invariant(s) broken", len(d.fails))
	}
	fmt.Fprintf(w, "all held; demo took %v\n", time.Since(start).Round(100*time.Millisecond))
	return nil
}

// newDemo prepares the record of a demo over requests: how many hosts ask
// for each package, and a ready channel per package that closes once every
// other requester waits on its builder.
func newDemo(w io.Writer, requests []demoRequest) *demo {
	d := &demo{w: w, runs: map[string]int{}, live: map[string]int{}, peak: map[string]int{},
		waits: map[string]map[string]bool{}, ready: map[string]chan struct{}{}, want: map[string]int{}}
	for _, r := range requests {
		d.want[r.id]++
		d.ready[r.id] = make(chan struct{})
	}
	for id, n := range d.want {
		if n == 1 {
			close(d.ready[id]) // nobody else to wait for
		}
	}
	return d
}

// startHosts gives each of the three simulated hosts its own etcd client
// and store (its own lease) on endpoint and root, adding them to hosts as
// they start; the caller closes them.
func (d *demo) startHosts(ctx context.Context, endpoint, root string, hosts map[string]*demoHost) error {
	cfg := node.DefaultConfig()
	cc, err := cfg.ClientConfig([]string{endpoint})
	if err != nil {
		return err
	}
	for _, name := range []string{"host-a", "host-b", "host-c"} {
		cli, err := clientv3.New(cc)
		if err != nil {
			return err
		}
		s, err := etcdstore.New(ctx, cli, root, etcdstore.WithHost(name), etcdstore.WithTTL(demoTTL),
			etcdstore.WithLockDelay(200*time.Millisecond), etcdstore.WithEvents(d.event(name)), etcdstore.WithPurpose("demo job"))
		if err != nil {
			cli.Close()
			return err
		}
		hosts[name] = &demoHost{name: name, cli: cli, store: s}
	}
	return nil
}

// buildAll is step 1: every request at once, then what each got and the
// builder runs per package, checked against the invariants.
func (d *demo) buildAll(ctx context.Context, hosts map[string]*demoHost) ([]demoResult, error) {
	w := d.w
	fmt.Fprintf(w, "1. %d concurrent build requests from 3 hosts for %d packages\n", len(demoRequests), len(d.want))
	results := make([]demoResult, len(demoRequests))
	var wg sync.WaitGroup
	for i, r := range demoRequests {
		wg.Go(func() {
			h := hosts[r.host].store.Handle(r.id)
			t0 := time.Now()
			var built bool
			err := h.BuildContext(ctx, func(bctx context.Context) error {
				built = true
				return d.builder(bctx, r.id, h.OutputDirectory())
			})
			results[i] = demoResult{r.host, r.id, err, built, time.Since(t0)}
		})
	}
	wg.Wait()
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	for _, r := range results {
		d.reportResult(r)
	}
	d.reportRuns()
	return results, nil
}

// reportResult prints what one request got and checks it.
func (d *demo) reportResult(r demoResult) {
	var what string
	switch {
	case r.err != nil && r.built:
		what = "ran the builder: it failed"
	case r.err != nil:
		what = "waited on the failed attempt: " + shortErr(r.err)
	case r.built:
		what = "ran the builder: built"
	case d.waited(r.id, r.host):
		what = "waited for another host's build, then used it"
	default:
		what = "already available"
	}
	fmt.Fprintf(d.w, "   %s  %-12s %-50s %v\n", r.host, r.id, what, r.took.Round(time.Millisecond))
	switch {
	case r.id == "broken-1" && !errors.Is(r.err, core.ErrBuildFailed):
		d.failf("%s: request for broken-1 returned %v, want an error wrapping ErrBuildFailed", r.host, r.err)
	case r.id != "broken-1" && r.err != nil:
		d.failf("%s: request for %s failed: %v", r.host, r.id, r.err)
	}
}

// reportRuns prints the builder runs per package and the waits, and checks
// that each package's builder ran exactly once and never twice at once.
func (d *demo) reportRuns() {
	ids := slices.Sorted(maps.Keys(d.want))
	var per []string
	for _, id := range ids {
		per = append(per, fmt.Sprintf("%s=%d", id, d.runs[id]))
		if d.runs[id] != 1 {
			d.failf("package %s: builder ran %d times, want exactly 1", id, d.runs[id])
		}
		if d.peak[id] > 1 {
			d.failf("package %s: %d builders ran at once", id, d.peak[id])
		}
	}
	nwaits := 0
	for _, hs := range d.waits {
		nwaits += len(hs)
	}
	fmt.Fprintf(d.w, "   builder runs per package: %s\n   waits on another host's build: %d\n\n", strings.Join(per, " "), nwaits)
}

// takeRefs is step 2: every host takes a reference to each package it got,
// and a reference to the failed package is refused.
func (d *demo) takeRefs(ctx context.Context, hosts map[string]*demoHost, results []demoResult) {
	fmt.Fprintln(d.w, "2. every host takes a reference to each package it got")
	for _, r := range results {
		if r.err == nil {
			if err := hosts[r.host].store.Handle(r.id).IncRefContext(ctx); err != nil {
				d.failf("%s: IncRef %s: %v", r.host, r.id, err)
			}
		}
	}
	if err := hosts["host-a"].store.Handle("broken-1").IncRefContext(ctx); !errors.Is(err, core.ErrPackageNotExist) {
		d.failf("IncRef on the failed package = %v, want ErrPackageNotExist", err)
	} else {
		fmt.Fprintln(d.w, "   host-a  broken-1     refused: package does not exist")
	}
	d.showRefs(ctx, hosts["host-a"].store, "toolchain-1", 3)
}

// crashAndRemove is steps 3 and 4: host-c crashes holding references; the
// removal of toolchain-1 is refused while any host holds it, including the
// crashed one until its lease expires, and then succeeds.
func (d *demo) crashAndRemove(ctx context.Context, hosts map[string]*demoHost) {
	w := d.w
	fmt.Fprintln(w, "\n3. host-c crashes while holding toolchain-1, sdk-2 and venv-c (its etcd client dies; no clean-up)")
	crashed := time.Now()
	hosts["host-c"].cli.Close()

	a := hosts["host-a"].store
	fmt.Fprintln(w, "\n4. removing toolchain-1")
	d.tryRemove(ctx, a, "toolchain-1", false)
	for _, h := range []string{"host-a", "host-b"} {
		if err := hosts[h].store.Handle("toolchain-1").DecRefContext(ctx); err != nil {
			d.failf("%s: DecRef: %v", h, err)
		}
	}
	fmt.Fprintln(w, "   host-a and host-b release their references")
	d.tryRemove(ctx, a, "toolchain-1", false)
	fmt.Fprintf(w, "   waiting for host-c's lease (TTL %v) to expire...\n", demoTTL)
	if err := waitNoRefs(ctx, a, "toolchain-1", demoTTL+15*time.Second); err != nil {
		d.failf("host-c's reference did not expire: %v", err)
	} else {
		fmt.Fprintf(w, "   host-c's reference expired %v after the crash\n", time.Since(crashed).Round(100*time.Millisecond))
	}
	d.tryRemove(ctx, a, "toolchain-1", true)
}

// collect is step 5: host-a releases venv-a and a GC sweep from a removes
// exactly the unreferenced packages, leaving the referenced trees intact.
func (d *demo) collect(ctx context.Context, a *etcdstore.Store) {
	fmt.Fprintln(d.w, "\n5. host-a releases venv-a; a GC sweep removes every unreferenced package")
	if err := a.Handle("venv-a").DecRefContext(ctx); err != nil {
		d.failf("host-a: DecRef venv-a: %v", err)
	}
	rep, err := a.Prune(ctx, etcdstore.PruneOptions{OlderThan: time.Nanosecond, Grace: -1})
	if err != nil {
		d.failf("GC: %v", err)
	}
	var removed []string
	for _, p := range rep.Removed {
		removed = append(removed, p.ID)
	}
	slices.Sort(removed)
	slices.Sort(rep.InUse)
	fmt.Fprintf(d.w, "   removed: %s (%s)\n   kept, referenced by host-b: %s\n", strings.Join(removed, ", "), human(rep.FreedBytes), strings.Join(rep.InUse, ", "))
	if !slices.Equal(removed, []string{"venv-a", "venv-c"}) {
		d.failf("GC removed %v, want [venv-a venv-c] (host-c's refs expired; host-b holds the rest)", removed)
	}
	if !slices.Equal(rep.InUse, []string{"sdk-2", "venv-b"}) {
		d.failf("GC kept %v as in use, want [sdk-2 venv-b]", rep.InUse)
	}
	for _, id := range []string{"sdk-2", "venv-b"} {
		if _, err := os.Stat(filepath.Join(a.Handle(id).OutputDirectory(), "result")); err != nil {
			d.failf("referenced package %s lost its tree: %v", id, err)
		}
	}
}

// builder simulates work: it waits until every other requester of id is
// waiting on it (so the demo shows them sharing one attempt), then writes
// the tree, or fails for broken-1.
func (d *demo) builder(ctx context.Context, id, out string) error {
	d.mu.Lock()
	d.runs[id]++
	d.live[id]++
	d.peak[id] = max(d.peak[id], d.live[id])
	ready := d.ready[id]
	d.mu.Unlock()
	defer func() {
		d.mu.Lock()
		d.live[id]--
		d.mu.Unlock()
	}()
	select {
	case <-ready:
	case <-time.After(10 * time.Second): // show must go on; the counts will tell
	case <-ctx.Done():
		return ctx.Err()
	}
	if id == "broken-1" {
		return errors.New("compiler exited with status 2")
	}
	return os.WriteFile(filepath.Join(out, "result"), []byte("contents of "+id+"\n"), 0o644)
}

func (d *demo) waited(id, host string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.waits[id][host]
}

func (d *demo) showRefs(ctx context.Context, s *etcdstore.Store, id string, want int) {
	info, err := s.Inspect(ctx, id)
	if err != nil {
		d.failf("inspect %s: %v", id, err)
		return
	}
	fmt.Fprintf(d.w, "   %s has %d references:\n", id, len(info.Refs))
	for _, r := range info.Refs {
		fmt.Fprintf(d.w, "     - %s pid %d (lease %s)\n", r.Host, r.PID, r.Lease)
	}
	if len(info.Refs) != want {
		d.failf("%s has %d references, want %d", id, len(info.Refs), want)
	}
}

func (d *demo) tryRemove(ctx context.Context, s *etcdstore.Store, id string, want bool) {
	ok, err := s.Handle(id).TryRemoveContext(ctx)
	switch {
	case err != nil:
		d.failf("TryRemove %s: %v", id, err)
	case ok:
		fmt.Fprintf(d.w, "   rm %s: removed\n", id)
	default:
		info, _ := s.Inspect(ctx, id)
		var by []string
		for _, r := range info.Refs {
			by = append(by, r.Host)
		}
		fmt.Fprintf(d.w, "   rm %s: refused, referenced by %s\n", id, strings.Join(by, ", "))
	}
	if err == nil && ok != want {
		d.failf("TryRemove %s = %v, want %v", id, ok, want)
	}
	if ok {
		if _, err := os.Stat(s.Handle(id).OutputDirectory()); !errors.Is(err, fs.ErrNotExist) {
			d.failf("%s removed but its tree is still there (%v)", id, err)
		}
	}
}

// waitNoRefs watches id's references until none is left.
func waitNoRefs(ctx context.Context, s *etcdstore.Store, id string, limit time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	pfx := s.Prefix() + "ref/" + id + "/"
	for {
		resp, err := s.Client().Get(ctx, pfx, clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			return err
		}
		if resp.Count == 0 {
			return nil
		}
		wch := s.Client().Watch(ctx, pfx, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1), clientv3.WithFilterPut())
		select {
		case <-wch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func shortErr(err error) string {
	var be *etcdstore.BuildError
	if errors.As(err, &be) {
		return fmt.Sprintf("failed on %s", be.Host)
	}
	return err.Error()
}
