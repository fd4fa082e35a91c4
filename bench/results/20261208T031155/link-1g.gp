set terminal pngcairo size 1000,550 font 'DejaVu Sans,11'
set output '/work/wt-bench/bench/results/20261208T031155/link-1g.png'
set title "10pct over 1g (tcp-limit 0.95 Gbit/s): time to a durable copy, lower is better; label: x the bare copy"
set style fill solid 0.85 border -1
set boxwidth 0.7
set yrange [0:*]
set ylabel 'wall time (s)'
set grid ytics
set xtics rotate by -20
set key off
set palette defined (1 '#1f77b4', 2 '#aaaaaa')
unset colorbox
plot '/work/wt-bench/bench/results/20261208T031155/link-1g.dat' using 1:3:4:xtic(2) with boxes lc palette, '' using 1:3:5 with labels offset 0,0.8
