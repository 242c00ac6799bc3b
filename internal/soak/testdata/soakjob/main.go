// Command soakjob is the builder and the job of the farm soak
// (internal/soak), built by the test:
//
//	soakjob build ID [fail]  write a package into $GRANARY_OUT: a few files
//	                         and manifest.json (names, sizes, sha256, a
//	                         nonce new at every build, and the nonce of
//	                         each need in $GRANARY_NEEDS); with "fail",
//	                         write a file and exit 7 (an intended failure)
//	soakjob check ID         the job: verify $GRANARY_PKG against its
//	                         manifest (and each need against the nonce it
//	                         was built on), sleep 50-300 ms, verify again
//	soakjob verify ID        verify $GRANARY_PKG once (the soak's final check)
//
// A check that finds a missing or changed file, a manifest of another ID,
// or a nonce that changed while it slept (the package was removed and
// rebuilt under it) does not report at once: the job may have been told
// that its reference was lost, and then granary-run stops it with SIGTERM,
// which is not a violation. So it writes an "excused" report if SIGTERM
// comes within $SOAKJOB_EXCUSE_WAIT, and a "violation" report otherwise, in
// the directory $SOAKJOB_REPORTS, where the test reads them. It exits 0
// when all is well and 1 otherwise.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Environment set by the test.
const (
	envReports    = "SOAKJOB_REPORTS"     // directory for violation and excuse reports
	envExcuseWait = "SOAKJOB_EXCUSE_WAIT" // how long a failed check waits for the launcher's SIGTERM
)

const manifestName = "manifest.json"

type manifest struct {
	ID    string `json:"id"`
	Nonce string `json:"nonce"`
	Files []file `json:"files"`
	// Needs are the packages it was built on ($GRANARY_NEEDS) and the
	// nonce each had then: while this package exists, each must still be
	// that very tree.
	Needs []need `json:"needs,omitempty"`
}

type need struct {
	ID    string `json:"id"`
	Nonce string `json:"nonce"`
}

type file struct {
	Name   string `json:"name"`
	Size   int    `json:"size"`
	SHA256 string `json:"sha256"`
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: soakjob build ID [fail] | check ID | verify ID")
		os.Exit(2)
	}
	id := os.Args[2]
	var err error
	switch os.Args[1] {
	case "build":
		err = build(id, len(os.Args) > 3 && os.Args[3] == "fail")
	case "check":
		err = check(id)
	case "verify":
		_, err = verify(os.Getenv("GRANARY_PKG"), id)
	default:
		err = fmt.Errorf("unknown subcommand %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "soakjob %s %s: %v\n", os.Args[1], id, err)
		os.Exit(1)
	}
}

// build writes the package. It takes a little while, so that builds of
// one ID on several hosts overlap and the others wait for the first.
func build(id string, fail bool) error {
	out := os.Getenv("GRANARY_OUT")
	if out == "" {
		return errors.New("no $GRANARY_OUT")
	}
	time.Sleep(time.Duration(100+rand.IntN(400)) * time.Millisecond)
	m := manifest{ID: id, Nonce: strconv.FormatUint(rand.Uint64(), 36)}
	for _, pair := range strings.Fields(os.Getenv("GRANARY_NEEDS")) {
		nid, dir, _ := strings.Cut(pair, ":")
		nm, err := verify(dir, nid)
		if err != nil {
			return fmt.Errorf("need %s: %w", nid, err)
		}
		m.Needs = append(m.Needs, need{ID: nid, Nonce: nm.Nonce})
	}
	if err := os.MkdirAll(filepath.Join(out, "lib"), 0o755); err != nil {
		return err
	}
	n := 3 + rand.IntN(4)
	for i := range n {
		name := fmt.Sprintf("f%d", i)
		if i%2 == 1 {
			name = filepath.Join("lib", name)
		}
		data := []byte(fmt.Sprintf("%s %s %s\n", id, m.Nonce, name))
		extra := make([]byte, 512+rand.IntN(16<<10))
		for j := range extra {
			extra[j] = byte(rand.Uint32())
		}
		data = append(data, extra...)
		if err := os.WriteFile(filepath.Join(out, name), data, 0o644); err != nil {
			return err
		}
		sum := sha256.Sum256(data)
		m.Files = append(m.Files, file{Name: name, Size: len(data), SHA256: hex.EncodeToString(sum[:])})
		if fail {
			fmt.Fprintf(os.Stderr, "soakjob: %s fails on purpose\n", id)
			os.Exit(7)
		}
	}
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(out, manifestName), b, 0o644)
}

// verify reads pkg's manifest and checks that it names id and that every
// file it lists is there with its size and digest.
func verify(pkg, id string) (manifest, error) {
	var m manifest
	b, err := os.ReadFile(filepath.Join(pkg, manifestName))
	if err != nil {
		return m, err
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("manifest: %w", err)
	}
	if m.ID != id {
		return m, fmt.Errorf("manifest of %q, want %q", m.ID, id)
	}
	if len(m.Files) == 0 {
		return m, errors.New("manifest lists no files")
	}
	for _, f := range m.Files {
		data, err := os.ReadFile(filepath.Join(pkg, f.Name))
		if err != nil {
			return m, err
		}
		sum := sha256.Sum256(data)
		if len(data) != f.Size || hex.EncodeToString(sum[:]) != f.SHA256 {
			return m, fmt.Errorf("%s: %d bytes sha256 %x, manifest (nonce %s) says %d bytes sha256 %s", f.Name, len(data), sum[:6], m.Nonce, f.Size, f.SHA256[:12])
		}
	}
	// The closure: each need is the tree this package was built on
	// (<root>/pkgs/<need>/contents, next to <root>/pkgs/<id>/contents).
	for _, n := range m.Needs {
		nm, err := verify(filepath.Join(filepath.Dir(filepath.Dir(pkg)), n.ID, "contents"), n.ID)
		if err != nil {
			return m, fmt.Errorf("need %s: %w", n.ID, err)
		}
		if nm.Nonce != n.Nonce {
			return m, fmt.Errorf("need %s was rebuilt under its dependent: nonce %s, built on %s", n.ID, nm.Nonce, n.Nonce)
		}
	}
	return m, nil
}

// check is the job: the package must stay intact while the job holds it.
func check(id string) error {
	pkg := os.Getenv("GRANARY_PKG")
	start := time.Now()
	first, err := verify(pkg, id)
	if err == nil {
		time.Sleep(time.Duration(50+rand.IntN(250)) * time.Millisecond)
		var again manifest
		again, err = verify(pkg, id)
		if err == nil && again.Nonce != first.Nonce {
			err = fmt.Errorf("rebuilt while held: nonce %s, then %s", first.Nonce, again.Nonce)
		}
	}
	if err == nil {
		return nil
	}
	// Something is wrong; was the job told its reference was lost?
	wait, perr := time.ParseDuration(os.Getenv(envExcuseWait))
	if perr != nil {
		wait = 10 * time.Second
	}
	failed := time.Now()
	detail := fmt.Sprintf("job pid %d (launcher pid %d) on %s holding %s since %s: check failed at %s: %v",
		os.Getpid(), os.Getppid(), pkg, id, start.Format(time.StampMilli), failed.Format(time.StampMilli), err)
	// Catch SIGTERM before saying MISMATCH: a launcher (and TestJobChecks)
	// may stop the job the moment it reads the line.
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	fmt.Fprintf(os.Stderr, "soakjob: MISMATCH: %s\n", detail)
	select {
	case <-term:
		report("excused", fmt.Sprintf("%s; stopped by its launcher (reference lost) %v later", detail, time.Since(failed).Round(time.Millisecond)))
		os.Exit(128 + int(syscall.SIGTERM))
	case <-time.After(wait):
	}
	report("violation", fmt.Sprintf("%s; not stopped by its launcher within %v", detail, wait))
	return err
}

// report writes one report file into $SOAKJOB_REPORTS.
func report(kind, detail string) {
	dir := os.Getenv(envReports)
	if dir == "" {
		return
	}
	name := filepath.Join(dir, fmt.Sprintf("%s-%d-%d.txt", kind, time.Now().UnixNano(), os.Getpid()))
	if err := os.WriteFile(name, []byte(detail+"\n"), 0o644); err != nil {
		fmt.Fprintf(os.Stderr, "soakjob: cannot write the report: %v\n", err)
	}
}
