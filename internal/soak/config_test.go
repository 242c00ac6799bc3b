package soak

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Faults the soak injects, in the order of soakConfig.Faults.
const (
	faultFollowerFreeze = "follower-freeze" // SIGSTOP an etcd follower for FollowerFreeze
	faultNodeKill       = "node-kill"       // kill -9 a random host's node; restart it NodeDown later
	faultLeaderFreeze   = "leader-freeze"   // SIGSTOP the etcd leader for LeaderFreeze
	faultLeaderRestart  = "leader-restart"  // kill -9 the etcd leader and start it again at once
)

var knownFaults = []string{faultFollowerFreeze, faultNodeKill, faultLeaderFreeze, faultLeaderRestart}

// soakConfig is the shape of one soak. defaultConfig is the bounded run
// CI makes; the farm run of issue 18 was the same with 5 s of linger, 15 s
// freezes, gc every 20 s, rm every 10 s, a node kill every 2 minutes, and
// hours of duration.
type soakConfig struct {
	Duration         time.Duration // how long the launchers and the faults run
	Hosts            int           // hosts, each with its own node and state directory
	LaunchersPerHost int           // job launchers per host, each running one job after another
	Packages         int           // package IDs the jobs pick from
	ZipfS            float64       // popularity exponent of the IDs (> 1)
	FailPercent      int           // share of IDs whose build fails on purpose, chosen by a hash of the ID

	TTL    time.Duration // every participant's lease TTL
	Linger time.Duration // the nodes' linger

	// Faults are injected one at a time, FaultEvery apart, cycling
	// through this list.
	Faults     []string
	FaultEvery time.Duration
	// LeaderFreeze must stay under 2/3 of the TTL for the soak to prove
	// what it claims: a leader frozen longer sees leases expire (their
	// last renewal can be TTL/3 older than the freeze), and when thawed
	// it may revoke them before it learns it was deposed (an etcd race,
	// docs/design.md "A frozen etcd member"); the nodes then lose their
	// lease, and jobs may be stopped (which the soak counts, and does not
	// call a violation) and builds abandoned (which it does count as
	// failures unless revocations are expected).
	LeaderFreeze   time.Duration
	FollowerFreeze time.Duration // a follower revokes nothing: any length (the clients move off it)
	NodeDown       time.Duration // how long a killed node stays down

	RmEvery     time.Duration // `granary rm` of a random ID from a random host
	GCEvery     time.Duration // `granary gc` from a random host
	GCOlderThan time.Duration // its --older-than and --grace
	// InvalidateEvery: `granary invalidate` of a random ID (and so of its
	// dependents) from a random host; 0: none.
	InvalidateEvery time.Duration

	Seed uint64 // of the jobs' choices and the churn; 0: from the clock
	// Dir, new or empty, keeps the processes' logs, etcd's data, the
	// shared root and the jobs' reports after the test (default: a
	// temporary directory, removed).
	Dir string
}

// defaultConfig is the CI soak: about 75 s of jobs and faults.
func defaultConfig() soakConfig {
	return soakConfig{
		Duration:         75 * time.Second,
		Hosts:            3,
		LaunchersPerHost: 4,
		Packages:         30,
		ZipfS:            1.1,
		FailPercent:      5,
		// The node's default TTL, above the failover minimum (node.FailoverMinTTL,
		// 14 s): at 5 s, as the farm run had, the nodes lose their lease in
		// the freezes themselves (2-4 times a run, builds abandoned), which
		// README's TTL guidance says and the soak cannot tell from a bug.
		TTL:             15 * time.Second,
		Linger:          3 * time.Second,
		Faults:          []string{faultFollowerFreeze, faultNodeKill, faultLeaderFreeze, faultLeaderRestart},
		FaultEvery:      8 * time.Second,
		LeaderFreeze:    2500 * time.Millisecond,
		FollowerFreeze:  4 * time.Second,
		NodeDown:        time.Second,
		RmEvery:         time.Second,
		GCEvery:         7 * time.Second,
		GCOlderThan:     2 * time.Second,
		InvalidateEvery: 9 * time.Second,
	}
}

// Environment variables of longer or harsher local runs.
const (
	envDuration        = "GRANARY_SOAK_DURATION"         // e.g. 30m
	envHosts           = "GRANARY_SOAK_HOSTS"            // e.g. 3
	envLaunchers       = "GRANARY_SOAK_LAUNCHERS"        // per host, e.g. 4
	envPackages        = "GRANARY_SOAK_PACKAGES"         // e.g. 30
	envTTL             = "GRANARY_SOAK_TTL"              // e.g. 5s
	envLinger          = "GRANARY_SOAK_LINGER"           // e.g. 5s
	envFaults          = "GRANARY_SOAK_FAULTS"           // comma-separated, "none" for none
	envFaultEvery      = "GRANARY_SOAK_FAULT_EVERY"      // e.g. 20s
	envLeaderFreeze    = "GRANARY_SOAK_LEADER_FREEZE"    // e.g. 15s (expect revoked leases)
	envFollowerFreeze  = "GRANARY_SOAK_FOLLOWER_FREEZE"  // e.g. 15s
	envNodeDown        = "GRANARY_SOAK_NODE_DOWN"        // e.g. 10s (longer than the TTL: its references expire)
	envRmEvery         = "GRANARY_SOAK_RM_EVERY"         // e.g. 10s
	envGCEvery         = "GRANARY_SOAK_GC_EVERY"         // e.g. 20s
	envInvalidateEvery = "GRANARY_SOAK_INVALIDATE_EVERY" // e.g. 30s; 0s: none
	envSeed            = "GRANARY_SOAK_SEED"             // to replay a run's choices (not its timing)
	envDir             = "GRANARY_SOAK_DIR"              // keep logs and reports here
)

// soakConfigFromEnv is defaultConfig changed by the GRANARY_SOAK_*
// variables that are set.
func soakConfigFromEnv(getenv func(string) string) (soakConfig, error) {
	c := defaultConfig()
	var errs []error
	durations := []struct {
		env string
		dst *time.Duration
	}{
		{envDuration, &c.Duration}, {envTTL, &c.TTL}, {envLinger, &c.Linger},
		{envFaultEvery, &c.FaultEvery}, {envLeaderFreeze, &c.LeaderFreeze},
		{envFollowerFreeze, &c.FollowerFreeze}, {envNodeDown, &c.NodeDown},
		{envRmEvery, &c.RmEvery}, {envGCEvery, &c.GCEvery}, {envInvalidateEvery, &c.InvalidateEvery},
	}
	for _, d := range durations {
		if v := getenv(d.env); v != "" {
			x, err := time.ParseDuration(v)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", d.env, err))
			}
			*d.dst = x
		}
	}
	ints := []struct {
		env string
		dst *int
	}{{envHosts, &c.Hosts}, {envLaunchers, &c.LaunchersPerHost}, {envPackages, &c.Packages}}
	for _, n := range ints {
		if v := getenv(n.env); v != "" {
			x, err := strconv.Atoi(v)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", n.env, err))
			}
			*n.dst = x
		}
	}
	if v := getenv(envFaults); v == "none" {
		c.Faults = nil
	} else if v != "" {
		c.Faults = strings.Split(v, ",")
	}
	if v := getenv(envSeed); v != "" {
		x, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", envSeed, err))
		}
		c.Seed = x
	}
	c.Dir = getenv(envDir)
	if err := errors.Join(errs...); err != nil {
		return c, err
	}
	return c, c.validate()
}

// validate reports every bad value.
func (c soakConfig) validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if c.Duration <= 0 {
		bad("duration %v: want > 0", c.Duration)
	}
	if c.Hosts < 2 {
		bad("%d hosts: want at least 2 (removals come from other hosts than the jobs)", c.Hosts)
	}
	if c.LaunchersPerHost < 1 || c.Packages < 1 {
		bad("%d launchers per host, %d packages: want at least 1 each", c.LaunchersPerHost, c.Packages)
	}
	if c.ZipfS <= 1 {
		bad("Zipf exponent %g: want > 1", c.ZipfS)
	}
	if c.FailPercent < 0 || c.FailPercent >= 100 {
		bad("fail percent %d: want 0-99", c.FailPercent)
	}
	if c.TTL < 3*time.Second || c.TTL%time.Second != 0 {
		bad("TTL %v: want whole seconds, at least 3 s (granary's minimum)", c.TTL)
	}
	if c.Linger < 0 || c.NodeDown < 0 || c.GCOlderThan <= 0 {
		bad("linger %v, node down %v, gc older-than %v: want ≥ 0, ≥ 0, > 0", c.Linger, c.NodeDown, c.GCOlderThan)
	}
	for _, f := range c.Faults {
		if !slices.Contains(knownFaults, f) {
			bad("unknown fault %q (known: %s)", f, strings.Join(knownFaults, ", "))
		}
	}
	if len(c.Faults) > 0 && c.FaultEvery <= 0 {
		bad("fault interval %v: want > 0", c.FaultEvery)
	}
	if c.LeaderFreeze <= 0 || c.FollowerFreeze <= 0 {
		bad("freezes %v, %v: want > 0", c.LeaderFreeze, c.FollowerFreeze)
	}
	if c.RmEvery <= 0 || c.GCEvery <= 0 {
		bad("rm every %v, gc every %v: want > 0", c.RmEvery, c.GCEvery)
	}
	return errors.Join(errs...)
}

// revocationsExpected reports whether a thawed etcd leader may revoke
// live leases (see LeaderFreeze), so that lost leases are a consequence
// of the faults and not a finding.
func (c soakConfig) revocationsExpected() bool {
	return slices.Contains(c.Faults, faultLeaderFreeze) && c.LeaderFreeze >= c.TTL*2/3
}
