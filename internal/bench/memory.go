package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/metrics"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/keys"
	"github.com/granary-build/granary/internal/paths"
)

// prune loads each of PrunePackages published packages (their etcd
// records only, written in bulk with the store's key layout, all last used
// two hours ago) and times one Prune sweep over them in a child process,
// as the node's GC loop runs it: older than one hour, at most
// PruneMaxRemovals removals. It does so twice per size: islands, then
// with every second package needing the one before it (need edges and
// records with needs: what the graph adds to a sweep's reads and to the
// removals it refuses).
func (r *run) prune(ctx context.Context) error {
	cli, err := r.client()
	if err != nil {
		return err
	}
	for _, n := range r.z.PrunePackages {
		for _, needs := range []bool{false, true} {
			if err := r.pruneOnce(ctx, cli, n, needs); err != nil {
				return err
			}
		}
	}
	return nil
}

// pruneOnce is one sweep of prune over n packages.
func (r *run) pruneOnce(ctx context.Context, cli *clientv3.Client, n int, needs bool) error {
	t := time.Now()
	if err := r.load(ctx, cli, "old", n, time.Now().Add(-2*time.Hour), needs); err != nil {
		return err
	}
	r.logf("  loaded %d packages (needs: %v) in %.1fs", n, needs, time.Since(t).Seconds())
	out, err := r.child(ctx, "prune", strconv.Itoa(r.z.PruneMaxRemovals))
	if err != nil {
		return err
	}
	name := sizeName(n)
	if needs {
		name += "_needs"
	}
	r.res["prune_"+name+"_s"] = out.Seconds
	r.res["prune_"+name+"_removed"] = float64(out.Count)
	r.res["prune_"+name+"_peak_rss_mb"] = out.PeakRSSMB
	r.res["prune_peak_rss_mb"] = max(r.res["prune_peak_rss_mb"], out.PeakRSSMB)
	r.logf("  prune over %d packages (needs: %v): %.2fs, removed %d, peak RSS %.0f MB", n, needs, out.Seconds, out.Count, out.PeakRSSMB)
	if want := min(n, r.z.PruneMaxRemovals); out.Count != want {
		return fmt.Errorf("prune over %d packages (needs: %v) removed %d, want %d", n, needs, out.Count, want)
	}
	cctx, cancel := context.WithTimeout(ctx, 4*r.cfg.OpTimeout)
	defer cancel()
	for _, kind := range []string{keys.Avail, keys.ATime, keys.Need} {
		if _, err := cli.Delete(cctx, keys.Space{Prefix: r.prefix}.Kind(kind), clientv3.WithPrefix()); err != nil {
			return err
		}
	}
	return nil
}

// refs loads RefPackages published packages and has a child process take
// Refs references on them through one store, then reports its memory.
func (r *run) refs(ctx context.Context) error {
	cli, err := r.client()
	if err != nil {
		return err
	}
	if err := r.load(ctx, cli, "refd", r.z.RefPackages, time.Now(), false); err != nil {
		return err
	}
	// IncRef hands a package out only once this host sees its (empty) tree.
	for i := range r.z.RefPackages {
		if err := os.MkdirAll(paths.Contents(r.root, fmt.Sprintf("refd-%d", i)), 0o755); err != nil {
			return err
		}
	}
	out, err := r.child(ctx, "refs", strconv.Itoa(r.z.Refs), strconv.Itoa(r.z.RefPackages), r.z.TTL.String())
	if err != nil {
		return err
	}
	if out.Count != r.z.Refs {
		return fmt.Errorf("the child found %d reference keys in etcd, want %d", out.Count, r.z.Refs)
	}
	r.res["node_rss_mb_"+sizeName(r.z.Refs)+"_refs"] = out.RSSMB
	r.res["node_peak_rss_mb_"+sizeName(r.z.Refs)+"_refs"] = out.PeakRSSMB
	r.res["node_go_heap_mb_"+sizeName(r.z.Refs)+"_refs"] = out.HeapMB
	r.res["node_refs_taken_per_s"] = float64(r.z.Refs) / out.Seconds
	r.logf("  %d references: RSS %.1f MB (peak %.1f MB, Go heap %.1f MB), taken at %.0f/s",
		r.z.Refs, out.RSSMB, out.PeakRSSMB, out.HeapMB, float64(r.z.Refs)/out.Seconds)
	return nil
}

// sizeName is 10000 → "10k".
func sizeName(n int) string {
	if n >= 1000 && n%1000 == 0 {
		return strconv.Itoa(n/1000) + "k"
	}
	return strconv.Itoa(n)
}

// load publishes n packages <name>-<i> by writing their avail and atime
// records directly, 32 packages per Txn, 8 Txns at a time; with needs,
// every odd-numbered package needs the one before it (its record lists it,
// and the need edge is written).
func (r *run) load(ctx context.Context, cli *clientv3.Client, name string, n int, at time.Time, needs bool) error {
	ks := keys.Space{Prefix: r.prefix}
	plain := etcdstore.PackageRecord{BuiltBy: "bench", PID: os.Getpid(), BuiltAt: at.UTC(), Digest: "sha256:none", Size: 1}
	rec, err := json.Marshal(plain)
	if err != nil {
		return err
	}
	atime := strconv.FormatInt(at.UnixNano(), 10)
	const perTxn = 32
	_, _, err = parallel(ctx, 8, (n+perTxn-1)/perTxn, func(ctx context.Context, b int) (time.Duration, error) {
		var ops []clientv3.Op
		for i := b * perTxn; i < min(n, (b+1)*perTxn); i++ {
			id := fmt.Sprintf("%s-%d", name, i)
			val := string(rec)
			if needs && i%2 == 1 {
				need := fmt.Sprintf("%s-%d", name, i-1)
				dep := plain
				dep.Needs = []string{need}
				b, _ := json.Marshal(dep)
				val = string(b)
				ops = append(ops, clientv3.OpPut(ks.NeedKey(need, id), ""))
			}
			ops = append(ops, clientv3.OpPut(ks.AvailKey(id), val), clientv3.OpPut(ks.ATimeKey(id), atime))
		}
		cctx, cancel := r.opCtx(ctx)
		defer cancel()
		_, err := cli.Txn(cctx).Then(ops...).Commit()
		return 0, err
	})
	return err
}

// childResult is what a child process prints.
type childResult struct {
	Seconds   float64 `json:"seconds"`
	Count     int     `json:"count"` // prune: removed; refs: reference keys found in etcd
	RSSMB     float64 `json:"rss_mb"`
	PeakRSSMB float64 `json:"peak_rss_mb"`
	HeapMB    float64 `json:"go_heap_mb"`
	Memory    string  `json:"memory"`
}

// child runs ChildMain(role, root, prefix, args...) in a child process if
// the config says how, else in this process (memory is then the Go heap of
// the whole process, not the role's).
func (r *run) child(ctx context.Context, role string, args ...string) (childResult, error) {
	full := append([]string{role, r.root, r.prefix}, args...)
	var out childResult
	if r.cfg.Child == nil {
		cli, err := r.client()
		if err != nil {
			return out, err
		}
		var buf bytes.Buffer
		if err := ChildMain(ctx, full, cli, &buf); err != nil {
			return out, err
		}
		err = json.Unmarshal(buf.Bytes(), &out)
		r.memory = "in-process: Go heap only (no child process configured); RSS keys are 0"
		out.RSSMB, out.PeakRSSMB = 0, 0
		return out, err
	}
	cmd := r.cfg.Child(ctx, full)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return out, fmt.Errorf("child %s: %w\n%s", role, err, strings.TrimSpace(stderr.String()))
	}
	if err := json.Unmarshal(stdout.Bytes(), &out); err != nil {
		return out, fmt.Errorf("child %s: bad output %q: %w", role, stdout.String(), err)
	}
	r.memory = out.Memory
	return out, nil
}

// ChildMain runs one role of the bench's child process: a memory
// scenario, which prints its result as JSON to stdout, or a server of the
// agent scenario, which serves until stdin ends. args are ROLE ROOT PREFIX
// [ARGS...]:
//
//	prune ROOT PREFIX MAX            one Prune sweep (older than 1h, at most MAX removals)
//	refs ROOT PREFIX N PKGS TTL      take N references on refd-0…refd-(PKGS-1) through one store
//	echo ROOT PREFIX SOCKET          the echo floor on SOCKET (no etcd: cli may be nil)
//	node ROOT PREFIX STATE HOST TTL  node's local API in STATE for a store on ROOT and PREFIX
//
// cli is the child's etcd client; ChildMain does not close it.
func ChildMain(ctx context.Context, args []string, cli *clientv3.Client, stdout io.Writer) error {
	if len(args) < 3 {
		return errors.New("bench child: want ROLE ROOT PREFIX [ARGS...]")
	}
	role, root, prefix, rest := args[0], args[1], args[2], args[3:]
	var res childResult
	var err error
	switch role {
	case "prune":
		res, err = childPrune(ctx, cli, root, prefix, rest)
	case "refs":
		res, err = childRefs(ctx, cli, root, prefix, rest)
	case "echo":
		return childEcho(ctx, rest)
	case "node":
		return childNode(ctx, cli, root, prefix, rest)
	default:
		return fmt.Errorf("bench child: unknown role %q", role)
	}
	if err != nil {
		return err
	}
	runtime.GC()
	res.RSSMB, res.PeakRSSMB = procStatusMB("VmRSS"), procStatusMB("VmHWM")
	res.HeapMB = heapMB()
	res.Memory = "child process: VmRSS and VmHWM from /proc/<pid>/status (whole process: store, etcd client, Go runtime); Go heap from runtime/metrics"
	return json.NewEncoder(stdout).Encode(res)
}

// childInts parses the first want arguments of a child role as integers.
func childInts(role string, rest []string, want int) ([]int, error) {
	if len(rest) < want {
		return nil, fmt.Errorf("bench child %s: want %d numbers, got %q", role, want, rest)
	}
	var out []int
	for _, a := range rest[:want] {
		n, err := strconv.Atoi(a)
		if err != nil {
			return nil, fmt.Errorf("bench child %s: %w", role, err)
		}
		out = append(out, n)
	}
	return out, nil
}

// childOptions are the store options of a memory child.
func childOptions(prefix string) []etcdstore.Option {
	return []etcdstore.Option{etcdstore.WithPrefix(prefix), etcdstore.WithHost("bench-child")}
}

// childPrune is ChildMain's prune role: one sweep.
func childPrune(ctx context.Context, cli *clientv3.Client, root, prefix string, rest []string) (childResult, error) {
	var res childResult
	n, err := childInts("prune", rest, 1)
	if err != nil {
		return res, err
	}
	s, err := etcdstore.New(ctx, cli, root, childOptions(prefix)...)
	if err != nil {
		return res, err
	}
	defer s.Close()
	t := time.Now()
	rep, err := s.Prune(ctx, etcdstore.PruneOptions{OlderThan: time.Hour, MaxRemovals: n[0]})
	if err != nil {
		return res, err
	}
	res.Seconds, res.Count = time.Since(t).Seconds(), len(rep.Removed)
	return res, nil
}

// childRefs is ChildMain's refs role: N references through one store,
// then the count of reference keys in etcd.
func childRefs(ctx context.Context, cli *clientv3.Client, root, prefix string, rest []string) (childResult, error) {
	var res childResult
	n, err := childInts("refs", rest, 2)
	if err != nil {
		return res, err
	}
	if len(rest) < 3 {
		return res, errors.New("bench child refs: want N PKGS TTL")
	}
	ttl, err := time.ParseDuration(rest[2])
	if err != nil {
		return res, err
	}
	s, err := etcdstore.New(ctx, cli, root, append(childOptions(prefix), etcdstore.WithTTL(ttl))...)
	if err != nil {
		return res, err
	}
	defer s.Close()
	t := time.Now()
	_, _, err = parallel(ctx, 32, n[0], func(ctx context.Context, i int) (time.Duration, error) {
		return 0, s.Handle(fmt.Sprintf("refd-%d", i%n[1])).IncRefContext(ctx)
	})
	if err != nil {
		return res, err
	}
	res.Seconds = time.Since(t).Seconds()

	cctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), etcdstore.DefaultOpTimeout)
	got, err := cli.Get(cctx, prefix+"ref/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	cancel()
	if err != nil {
		return res, err
	}
	res.Count = int(got.Count)
	return res, nil
}

// procStatusMB reads a "kB" field of /proc/self/status in MB (0 if absent).
func procStatusMB(field string) float64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			if err == nil {
				return kb / 1024
			}
		}
	}
	return 0
}

// heapMB is the live Go heap (objects) in MB.
func heapMB() float64 {
	s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindUint64 {
		return 0
	}
	return float64(s[0].Value.Uint64()) / (1 << 20)
}
