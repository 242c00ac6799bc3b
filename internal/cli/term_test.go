package cli

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"golang.org/x/sys/unix"

	"github.com/granary-build/granary/etcdstore"
)

// openPTY opens a pseudo-terminal of 80x24 (without a dependency: the
// /dev/ptmx protocol through x/sys/unix) and returns its two ends.
func openPTY(t *testing.T) (master, tty *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals here: %v", err)
	}
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		m.Close()
		t.Fatalf("unlockpt: %v", err)
	}
	n, err := unix.IoctlGetUint32(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		m.Close()
		t.Fatalf("ptsname: %v", err)
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		m.Close()
		t.Fatalf("open pts: %v", err)
	}
	if err := unix.IoctlSetWinsize(int(s.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: 24, Col: 80}); err != nil {
		t.Fatalf("set window size: %v", err)
	}
	return m, s
}

// screen replays what a terminal of width columns shows for out: it
// understands \r, \n and ESC[K, and counts the times a line wrapped.
type screen struct {
	lines   []string
	wraps   int
	inPlace int // ESC[K after \r: in-place rewrites
}

func replay(out string, width int) screen {
	var sc screen
	var cur []rune
	col := 0
	for i := 0; i < len(out); {
		switch {
		case strings.HasPrefix(out[i:], "\033[K"):
			cur = cur[:min(col, len(cur))]
			sc.inPlace++
			i += 3
			continue
		case out[i] == '\r':
			col = 0
		case out[i] == '\n':
			sc.lines = append(sc.lines, string(cur))
			cur, col = nil, 0
		default:
			r, n := utf8.DecodeRuneInString(out[i:])
			if col == width { // the terminal wraps
				sc.wraps++
				sc.lines = append(sc.lines, string(cur))
				cur, col = nil, 0
			}
			if col < len(cur) {
				cur[col] = r
			} else {
				cur = append(cur, r)
			}
			col++
			i += n
			continue
		}
		i++
	}
	if len(cur) > 0 {
		sc.lines = append(sc.lines, string(cur))
	}
	return sc
}

// TestWaitingLineFitsTerminal drives the build's progress display on a
// real pseudo-terminal of 80 columns with a status far longer than that:
// every update rewrites one line in place, nothing wraps, and the sealing
// progress ends with its own line.
func TestWaitingLineFitsTerminal(t *testing.T) {
	master, tty := openPTY(t)
	defer master.Close()
	if !isTerminal(tty) {
		t.Fatal("isTerminal(pts) = false")
	}
	if w := termWidth(tty); w != 80 {
		t.Fatalf("termWidth(pts) = %d, want 80", w)
	}
	out := make(chan string, 1)
	go func() {
		var b bytes.Buffer
		io.Copy(&b, master) // ends with EIO once the tty side is closed
		out <- b.String()
	}()

	p := newProgress(tty, "cpython-3.12.7-4f1c2a", true)
	logDir := "/mnt/granary/shared/root/pkgs/cpython-3.12.7-4f1c2a/logs/" + strings.Repeat("x", 40)
	const waits, seals = 5, 3
	for range waits {
		p.event(etcdstore.Event{Kind: etcdstore.EventWaiting, ID: "cpython-3.12.7-4f1c2a", Host: "build-host-17.example.org", PID: 12345, Since: time.Now(), LogDir: logDir})
	}
	for i := range seals + 1 {
		p.event(etcdstore.Event{Kind: etcdstore.EventSealing, ID: "cpython-3.12.7-4f1c2a", Files: int64(1000 * (i + 1)), Size: int64(i+1) << 28,
			Elapsed: time.Duration(i+1) * time.Second, Done: i == seals})
	}
	p.stop()
	tty.Close()
	sc := replay(strings.ReplaceAll(<-out, "\r\n", "\n"), 80) // the pty's ONLCR

	if sc.wraps != 0 {
		t.Errorf("%d line(s) wrapped at 80 columns: %q", sc.wraps, sc.lines)
	}
	if sc.inPlace < waits+seals+1 {
		t.Errorf("%d in-place rewrites, want at least %d (one per update)", sc.inPlace, waits+seals+1)
	}
	if len(sc.lines) != 1 {
		t.Fatalf("the screen has %d lines, want 1 (every update in place): %q", len(sc.lines), sc.lines)
	}
	if !strings.HasPrefix(sc.lines[0], "granary: cpython-3.12.7-4f1c2a: sealed the output: 4000 files, 1.0 GiB") {
		t.Errorf("last line %q, want the final sealing line", sc.lines[0])
	}
}

// TestWaitingLinesNotTerminal: without a terminal, each event is a line of
// its own, uncut.
func TestWaitingLinesNotTerminal(t *testing.T) {
	var b bytes.Buffer
	p := newProgress(&b, "pkg", false)
	long := strings.Repeat("d", 200)
	for range 3 {
		p.event(etcdstore.Event{Kind: etcdstore.EventWaiting, ID: "pkg", Host: "h", PID: 1, Since: time.Now(), LogDir: long})
	}
	p.event(etcdstore.Event{Kind: etcdstore.EventSealing, ID: "pkg", Files: 1, Size: 1, Elapsed: time.Second, Done: true})
	p.stop()
	lines := strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n")
	if len(lines) != 4 || strings.Contains(b.String(), "\r") || !strings.Contains(lines[0], long) {
		t.Fatalf("output %q: want 4 whole lines, no carriage returns", b.String())
	}
}

func TestFitWidth(t *testing.T) {
	tests := []struct {
		name  string
		line  string
		width int
		want  string
	}{
		{"short", "abc", 80, "abc"},
		{"exactly width-1", strings.Repeat("a", 79), 80, strings.Repeat("a", 79)},
		{"width", strings.Repeat("a", 80), 80, strings.Repeat("a", 78) + "…"},
		{"multibyte", "ééééé", 4, "éé…"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := fitWidth(tt.line, tt.width); got != tt.want {
				t.Errorf("fitWidth(%q, %d) = %q, want %q", tt.line, tt.width, got, tt.want)
			}
		})
	}
}

// TestWaitRootLine: a store that looks again for a shared root it cannot
// see says so, although the event names no package.
func TestWaitRootLine(t *testing.T) {
	var b bytes.Buffer
	p := newProgress(&b, "pkg", false)
	p.event(etcdstore.Event{Kind: etcdstore.EventWaitRoot, Host: "h1", Since: time.Now(), Elapsed: time.Minute,
		Err: fmt.Errorf("/mnt/granary does not exist")})
	p.stop()
	for _, want := range []string{"/mnt/granary does not exist", "bound by h1", "up to 1m0s"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("output %q does not say %q", b.String(), want)
		}
	}
}
