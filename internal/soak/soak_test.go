package soak

import (
	"fmt"
	"maps"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestFarmSoak runs the farm (see the package doc) for cfg.Duration, then
// checks:
//
//   - no violation: no job saw its package change or vanish while it held
//     it, unless granary-run stopped it because its reference was lost;
//     every package etcd calls available is intact at the end;
//   - no reference left in etcd once the jobs ended and the linger and the
//     TTL passed (a killed node's references go with its lease);
//   - no build failure but the intended ones (and those of a build whose
//     node the soak killed under it), and no build still "building" at the
//     end;
//   - no command hung (a job or build that took a minute where they take
//     a second: the goroutines of a hung Go program are kept in a file);
//   - no node exited by itself, and the soak did what it claims (jobs ran,
//     packages were removed, every fault was injected).
func TestFarmSoak(t *testing.T) {
	if testing.Short() {
		t.Skip("farm soak: a 3-process etcd cluster, 3 nodes and job launchers under faults for about 90 s (skipped with -short)")
	}
	if runtime.GOOS != "linux" {
		t.Skip("farm soak: needs Linux (SIGSTOP of etcd members, the nodes' peer credentials)")
	}
	cfg, err := soakConfigFromEnv(os.Getenv)
	if err != nil {
		t.Fatalf("soak configuration: %v", err)
	}
	f := newFarm(t, cfg)
	f.run()

	// The end, in order:
	//  1. (run) the launchers, the churn and the faults have stopped, and
	//     every process runs again;
	//  2. the references drain: each node lets go a linger after its last
	//     job, and a killed node's lease expires a TTL after the kill;
	//  3. what is left is counted, the packages verified, the reports read.
	drain := cfg.Linger + cfg.TTL + 2*time.Second
	left, err := f.leftRefs(drain)
	if err != nil {
		t.Fatalf("reading the references left: %v", err)
	}
	f.logf("references left in etcd (waited up to %v for them to go): %d", drain, len(left))
	broken, stuck, err := f.checkPackages()
	if err != nil {
		t.Fatalf("checking the packages: %v", err)
	}
	violations, err := f.readReports("violation")
	if err != nil {
		t.Fatal(err)
	}
	excused, err := f.readReports("excused")
	if err != nil {
		t.Fatal(err)
	}
	violations = append(violations, broken...)
	for _, h := range f.hosts {
		h.mu.Lock()
		for _, c := range h.crashes {
			t.Errorf("the node of %s exited by itself: %s", h.name, c)
		}
		h.mu.Unlock()
	}

	f.summary(len(left), len(violations), len(excused), len(stuck))

	for _, v := range violations {
		t.Errorf("VIOLATION: %s", v)
	}
	if len(left) > 0 {
		var ids []string
		for _, l := range left {
			t.Errorf("LEAK: reference still in etcd %v after the jobs ended: %v", drain, l)
			ids = append(ids, l.id)
		}
		t.Logf("node log lines about the leaked packages:\n%s", strings.Join(f.nodeLogLines(ids, 20), "\n"))
	}
	if len(stuck) > 0 {
		var ids []string
		for _, s := range stuck {
			t.Errorf("STUCK BUILD: %s", s)
			id, _, _ := strings.Cut(s, ":")
			ids = append(ids, id)
		}
		t.Logf("node log lines about the stuck packages:\n%s", strings.Join(f.nodeLogLines(ids, 20), "\n"))
	}
	f.tally.mu.Lock()
	defer f.tally.mu.Unlock()
	for _, msg := range f.tally.failures {
		t.Errorf("BUILD FAILURE (unintended): %s", msg)
	}
	for _, msg := range f.tally.hangs {
		t.Errorf("HUNG: %s", msg)
	}
	if len(f.tally.hangs) > 0 || len(stuck) > 0 {
		// Where the nodes wait (this stops them).
		for _, h := range f.hosts {
			t.Logf("goroutines of the node of %s blocked for a minute or more:\n%s", h.name, h.stuckGoroutines())
		}
	}
	for _, msg := range f.tally.problems {
		t.Errorf("soak machinery: %s", msg)
	}
	if f.tally.jobs.Load() == 0 {
		t.Errorf("no job ran to completion: the soak checked nothing")
	}
	if f.tally.removed.Load()+f.tally.gcRemoved.Load() == 0 {
		t.Errorf("nothing was removed: the soak did not exercise removal")
	}
	for _, fault := range cfg.Faults {
		if f.tally.faults[fault] == 0 && cfg.Duration > time.Duration(len(cfg.Faults)+1)*cfg.FaultEvery {
			t.Errorf("fault %s was never injected", fault)
		}
	}
	if t.Failed() && cfg.Dir == "" {
		t.Logf("set %s=DIR to keep the processes' logs and the jobs' reports", envDir)
	}
}

// summary logs what the soak did and found.
func (f *farm) summary(left, violations, excused, stuck int) {
	t := &f.tally
	t.mu.Lock()
	defer t.mu.Unlock()
	faults := []string{"none"}
	if len(t.faults) > 0 {
		faults = nil
	}
	for _, k := range slices.Sorted(maps.Keys(t.faults)) {
		faults = append(faults, fmt.Sprintf("%s %d", k, t.faults[k]))
	}
	storeLost, regLost := f.leasesLost()
	f.logf("summary:\n"+
		"  jobs:       %d ok, %d stopped by granary-run (reference lost), %d failed their check, %d other errors, %d gave up (removed after each build)\n"+
		"  builds:     %d ran the builder, %d waited for another, %d found it available\n"+
		"  failures:   %d intended, %d node killed mid-build, %d lease lost (revocations expected), %d need invalidated mid-build, %d UNINTENDED\n"+
		"  removals:   rm %d removed, %d refused, %d absent, %d errors; gc %d sweeps removed %d, %d errors\n"+
		"  graph:      %d builds found a need missing or invalid and built it first; invalidate %d done, %d absent, %d errors\n"+
		"  faults:     %s; the nodes lost their store's lease %d times, their registration's %d times\n"+
		"  found:      %d VIOLATIONS, %d excused mismatches (job stopped), %d REFERENCES LEFT, %d STUCK BUILDS, %d HUNG COMMANDS",
		t.jobs.Load(), t.jobsStopped.Load(), t.jobsFailedCheck.Load(), t.jobErrors.Load(), t.jobsGaveUp.Load(),
		t.buildsRan.Load(), t.buildsWaited.Load(), t.buildsFound.Load(),
		t.failIntended.Load(), t.failNodeKilled.Load(), t.failLeaseLost.Load(), t.failInvalidated.Load(), len(t.failures),
		t.removed.Load(), t.rmRefused.Load(), t.rmAbsent.Load(), t.rmErrors.Load(), t.gcSweeps.Load(), t.gcRemoved.Load(), t.gcErrors.Load(),
		t.needsFirst.Load(), t.invalidated.Load(), t.invAbsent.Load(), t.invErrors.Load(),
		strings.Join(faults, ", "), storeLost, regLost,
		violations, excused, left, stuck, len(t.hangs))
	for _, kind := range slices.Sorted(maps.Keys(t.notes)) {
		f.logf("%s: %d, e.g.:\n  %s", kind, t.counts[kind], strings.Join(t.notes[kind], "\n  "))
	}
}
