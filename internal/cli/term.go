package cli

import (
	"io"
	"os"
	"strconv"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// termWidth returns the width in columns of the terminal w writes to: from
// the terminal itself (TIOCGWINSZ, so a resize takes effect at the next
// update), else $COLUMNS, else 80.
func termWidth(w io.Writer) int {
	if f, ok := w.(*os.File); ok {
		if ws, err := unix.IoctlGetWinsize(int(f.Fd()), unix.TIOCGWINSZ); err == nil && ws.Col > 0 {
			return int(ws.Col)
		}
	}
	if n, err := strconv.Atoi(os.Getenv("COLUMNS")); err == nil && n > 0 {
		return n
	}
	return 80
}

// fitWidth cuts line so that it takes at most width-1 columns (a line that
// fills the last column makes some terminals wrap), ending a cut line with
// "…". It counts one column per rune: status lines are ASCII but for paths
// and names.
func fitWidth(line string, width int) string {
	limit := max(width-1, 1)
	if utf8.RuneCountInString(line) <= limit {
		return line
	}
	runes := []rune(line)
	return string(runes[:limit-1]) + "…"
}
