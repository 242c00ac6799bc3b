package bench

import (
	"context"
	"testing"
	"time"
)

// TestFarmTiny runs the farm simulation on a token load and checks its
// counts: in direct mode each job costs exactly two etcd writes (its
// reference's put and delete).
func TestFarmTiny(t *testing.T) {
	cfg := DefaultFarm()
	cfg.Hosts, cfg.Packages, cfg.Rate, cfg.Duration, cfg.Warm, cfg.Hold = []int{3}, 5, 200, 300*time.Millisecond, 50*time.Millisecond, time.Millisecond
	cfg.Dir = t.TempDir()
	res, err := Farm(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range farmModes {
		key := "farm_" + m.name + "_h3_"
		if res[key+"jobs"] < 1 {
			t.Errorf("%s: %v jobs, want some", m.name, res[key+"jobs"])
		}
		t.Logf("%s: %v writes per job, start p99 %.2f ms", m.name, res[key+"writes_per_job"], res[key+"start_p99_ms"])
	}
	if got := res["farm_direct_h3_writes_per_job"]; got != 2 {
		t.Errorf("direct mode: %v etcd writes per job, want 2 (a reference's put and delete)", got)
	}
}
